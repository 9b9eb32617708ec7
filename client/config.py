"""Defaults shared by the CLI and the services: ports and the default model folder."""

from __future__ import annotations

import os
from pathlib import Path

import ditserve

# role -> (gRPC port, metrics port); DESIGN.md's table.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50050, 9400),
    "encoder": (50051, 9401),
    "denoiser": (50052, 9402),
    "vae": (50053, 9403),
}
STAGES = ("encoder", "denoiser", "vae")
DEFAULT_MODEL_NAME = "shapes-flux"


def repo_root() -> Path:
    """The checkout this package runs from (protos/ditserve/__init__.py is two levels down)."""
    return Path(ditserve.__file__).resolve().parents[2]


def default_model_dir() -> Path:
    """$DITSERVE_MODEL, else the model shipped in the repository's models/ folder."""
    return Path(os.environ.get("DITSERVE_MODEL") or repo_root() / "models" / DEFAULT_MODEL_NAME)
