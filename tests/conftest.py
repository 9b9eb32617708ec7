"""Shared fixtures: the shipped image and video models, the tiny random Wan folder and a real four-process
stack on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ditserve.client.config import default_model_dir, default_video_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub, ever


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = default_model_dir()
    assert (path / "model_index.json").is_file(), f"the shipped model is missing at {path}"
    return path


@pytest.fixture(scope="session")
def video_model_dir() -> Path:
    """The shipped video model (models/shapes-wan; $DITSERVE_VIDEO_MODEL runs its tests on another folder)."""
    path = default_video_model_dir()
    if not (path / "model_index.json").is_file():  # until models/shapes-wan is trained and committed
        pytest.skip(f"the shipped video model is not at {path} nor in models/ yet (DITSERVE_VIDEO_MODEL=DIR runs it)")
    return path


@pytest.fixture(scope="session")
def wan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ditserve make-tiny-model --family wan`'s folder: 64x64, 9 frames at 8 fps, 2 heads, random weights."""
    from ditserve.services.tools.modelgen.tiny_wan import write_tiny_wan

    return write_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="session")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from ditserve.client.launcher import Ports, Stack

    logs = tmp_path_factory.mktemp("stack-logs")
    profiles = tmp_path_factory.mktemp("profiles")
    extra = {role: ["--profile-dir", str(profiles)] for role in ("gateway", "encoder", "denoiser", "vae")}
    running = Stack(model=model_dir, ports=Ports.free(), log_dir=logs, extra_args=extra)
    running.start(timeout=180)
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"services did not exit cleanly: {codes}; logs in {logs}"
