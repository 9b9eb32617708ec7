"""Defaults shared by the CLI and the services: ports, the shipped model folders (image and video), and the
OpenMP setting the services run under."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
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
# The denoiser's --quantize and --joint-cfg values, which `ditserve up` passes on as given.
QUANTIZE_CHOICES = ("none", "int8-weight", "fp8")
JOINT_CFG_CHOICES = ("batched", "always")
DEFAULT_HTTP_PORT = 8000  # the gateway's OpenAI-compatible HTTP API
DEFAULT_MODEL_NAME = "shapes-flux"  # the shipped image model, the default everywhere a model is taken
DEFAULT_VIDEO_MODEL_NAME = "shapes-wan"  # the shipped video model, picked by name (--model shapes-wan)
SHIPPED_MODEL_NAMES = (DEFAULT_MODEL_NAME, DEFAULT_VIDEO_MODEL_NAME)

# How long the denoiser's idle OpenMP threads poll for work before they sleep: libgomp's GOMP_SPINCOUNT,
# ~0.3 ms here (its default, 300000, is ~3 ms; OMP_WAIT_POLICY=PASSIVE is none, ACTIVE minutes).
DENOISER_SPIN_COUNT = "30000"


def services_openmp(environ: Mapping[str, str], role: str = "denoiser") -> dict[str, str]:
    """The OpenMP variables `ditserve serve ROLE` adds to an environment that chose no wait policy.

    Spinning only where the heavy work is. The denoiser's threads poll briefly: always asleep (PASSIVE),
    they pay a wake-up on every op, which doubled a request on the shipped image model. The encoder's
    and the VAE's sleep at once: when requests overlap they share the cores with the denoiser, and
    polling teams there fight it for them. (Fewer threads for those two would fight less, but change
    their outputs' low bits: the stages stay bit-exact with the family's pipeline.)
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if role == "denoiser":
        return {"GOMP_SPINCOUNT": DENOISER_SPIN_COUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


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
