"""Start-up refuses what it cannot serve, before binding, with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ditserve.client.launcher import free_port

pytestmark = pytest.mark.integration


def _serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ditserve.client.cli", "serve", *args]
    command += ["--port", str(free_port()), "--metrics-port", str(free_port())]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = _serve("encoder", "--model", str(tmp_path / "nope"))
    assert result.returncode != 0
    assert "nope does not exist" in result.stderr


def test_folder_without_model_index_is_a_clear_error(tmp_path: Path) -> None:
    result = _serve("vae", "--model", str(tmp_path))
    assert result.returncode != 0
    assert "model_index.json is missing" in result.stderr


def test_unavailable_attention_backend_lists_what_can_run(model_dir: Path) -> None:
    result = _serve("denoiser", "--model", str(model_dir), "--attention-backend", "sdpa_cudnn")
    assert result.returncode != 0
    assert "'sdpa_cudnn' cannot run" in result.stderr
    assert "torch_sdpa      available" in result.stderr
