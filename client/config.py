"""Defaults shared by the CLI and the services: ports and the shipped model folders (image and video)."""

from __future__ import annotations

import argparse
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
DEFAULT_MODEL_NAME = "shapes-flux"  # the shipped image model, the default everywhere a model is taken
DEFAULT_VIDEO_MODEL_NAME = "shapes-wan"  # the shipped video model, picked by name (--model shapes-wan)
SHIPPED_MODEL_NAMES = (DEFAULT_MODEL_NAME, DEFAULT_VIDEO_MODEL_NAME)


def repo_root() -> Path:
    """The checkout this package runs from (protos/ditserve/__init__.py is two levels down)."""
    return Path(ditserve.__file__).resolve().parents[2]


def shipped_model_dirs(name: str) -> list[Path]:
    """Where a shipped model can be: a checkout's models/ (editable install), then the wheel's copy."""
    return [repo_root() / "models" / name, Path(ditserve.__file__).resolve().parent / "models" / name]


def shipped_model_dir(name: str) -> Path:
    """The first of shipped_model_dirs(name) that holds a model, else the wheel's (for the error)."""
    candidates = shipped_model_dirs(name)
    return next((path for path in candidates if (path / "model_index.json").is_file()), candidates[-1])


def _env_or_shipped(variable: str, name: str) -> Path:
    return Path(os.environ[variable]) if os.environ.get(variable) else shipped_model_dir(name)


def default_model_dir() -> Path:
    """$DITSERVE_MODEL, else the shipped image model."""
    return _env_or_shipped("DITSERVE_MODEL", DEFAULT_MODEL_NAME)


def default_video_model_dir() -> Path:
    """$DITSERVE_VIDEO_MODEL, else the shipped video model: what video-only tools and tests default to."""
    return _env_or_shipped("DITSERVE_VIDEO_MODEL", DEFAULT_VIDEO_MODEL_NAME)


def model_path(text: str) -> Path:
    """A --model argument: a folder, or a shipped model's name (`shapes-wan`) when no such folder is here,
    so an installed wheel serves its video model without the user finding site-packages."""
    path = Path(text)
    return shipped_model_dir(text) if text in SHIPPED_MODEL_NAMES and not path.exists() else path


def add_model_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--model (alias --model-path, SGLang's name) for every command that takes a model: one text, one type;
    `note` adds what the command does with it."""
    parser.add_argument(
        "--model",
        "--model-path",
        dest="model",
        type=model_path,
        default=str(default_model_dir()),
        help=f"local diffusers-format folder, or a shipped model's name ({DEFAULT_MODEL_NAME};"
        f" {DEFAULT_VIDEO_MODEL_NAME}){note} (default: $DITSERVE_MODEL, else {DEFAULT_MODEL_NAME})",
    )


def missing_model_hint(path: Path) -> str | None:
    """None when `path` holds a diffusers model folder; else what is missing and how to get it."""
    if (path / "model_index.json").is_file():
        return None
    return (
        f"no model at {path} (model_index.json missing). Pass --model DIR or set DITSERVE_MODEL to a local"
        " diffusers-format folder, or name a shipped model (--model shapes-flux); they ship in the"
        f" ditserve wheel and in a checkout's models/ (`ditserve train-default-model [--family wan] --out DIR`"
        " rebuilds one)"
    )
