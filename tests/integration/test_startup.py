"""Start-up refuses what it cannot serve, before binding, with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ditserve.client.launcher import free_port
from ditserve.client.stub import StageClient

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


def test_pickle_weights_load_only_when_allowed(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path / "pickled"
    shutil.copytree(model_dir, folder)
    shutil.rmtree(folder / "vae")
    AutoencoderKL.from_pretrained(model_dir / "vae").save_pretrained(folder / "vae", safe_serialization=False)
    assert not list((folder / "vae").glob("*.safetensors"))
    refused = _serve("vae", "--model", str(folder))
    assert refused.returncode != 0 and "--allow-pickle" in refused.stderr
    port = free_port()
    command = [sys.executable, "-m", "ditserve.client.cli", "serve", "vae", "--model", str(folder), "--allow-pickle"]
    process = subprocess.Popen([*command, "--port", str(port), "--metrics-port", str(free_port())])
    try:
        StageClient(f"127.0.0.1:{port}").wait_ready(120)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_broken_calibrated_teacache_coefficients_are_refused(model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    sidecar = json.loads((folder / "ditserve.json").read_text())
    (folder / "ditserve.json").write_text(json.dumps({**sidecar, "teacache_coefficients": [1.0, 2.0]}))
    result = _serve("denoiser", "--model", str(folder))
    assert result.returncode != 0
    assert "ditserve.json: teacache.coefficients: must be the 5 coefficients" in result.stderr
