"""Defaults shared by the CLI and the services: ports and the default model folder."""

from __future__ import annotations

import os
from pathlib import Path

import ditserve

# role -> (gRPC port, metrics port), as README's port table lists them.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50050, 9400),
    "encoder": (50051, 9401),
    "denoiser": (50052, 9402),
    "vae": (50053, 9403),
}
STAGES = ("encoder", "denoiser", "vae")
DEFAULT_HTTP_PORT = 8000  # the gateway's OpenAI-compatible HTTP API
DEFAULT_MODEL_NAME = "shapes-flux"


def repo_root() -> Path:
    """The checkout this package runs from (protos/ditserve/__init__.py is two levels down)."""
    return Path(ditserve.__file__).resolve().parents[2]


def shipped_model_dirs() -> list[Path]:
    """Where the default model can be: a checkout's models/ (editable install), then the wheel's copy."""
    return [
        repo_root() / "models" / DEFAULT_MODEL_NAME,
        Path(ditserve.__file__).resolve().parent / "models" / DEFAULT_MODEL_NAME,
    ]


def default_model_dir() -> Path:
    """$DITSERVE_MODEL, else the shipped model (the first of shipped_model_dirs() that exists)."""
    if os.environ.get("DITSERVE_MODEL"):
        return Path(os.environ["DITSERVE_MODEL"])
    candidates = shipped_model_dirs()
    return next((path for path in candidates if (path / "model_index.json").is_file()), candidates[-1])


def missing_model_hint(path: Path) -> str | None:
    """None when `path` holds a diffusers model folder; else what is missing and how to get it."""
    if (path / "model_index.json").is_file():
        return None
    return (
        f"no model at {path} (model_index.json missing). Pass --model DIR or set DITSERVE_MODEL to a local"
        " diffusers-format folder; the default model ships in the ditserve wheel and in a checkout's"
        f" models/{DEFAULT_MODEL_NAME} (`ditserve train-default-model --out DIR` rebuilds it)"
    )
