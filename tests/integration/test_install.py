"""A fresh virtualenv, a non-editable install at the declared grpcio/protobuf floors, then `ditserve up`,
`ditserve generate` and the HTTP API from outside the checkout: the wheel carries the protos and the model.

One test, because torch is large: it installs from pip's cache or configured local files where
they exist (scripts/install-torch.sh picks the CPU build on a machine without a GPU).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import http_call, read_until_ready
from PIL import Image

from ditserve.client.config import repo_root
from ditserve.client.launcher import stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = repo_root()
PINNED = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")


def declared_floors() -> dict[str, str]:
    """name -> the `>=` floor pyproject.toml declares for it (base and [serve])."""
    text = (ROOT / "pyproject.toml").read_text()
    return {name: version for name, version in re.findall(r'"([a-z][a-z0-9-]*)>=([0-9.]+)', text) if name in PINNED}


def run(command: list[str], cwd: Path, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def installed(pip: str, cwd: Path) -> dict[str, str]:
    rows = json.loads(run([pip, "list", "--format", "json"], cwd).stdout)
    return {row["name"].lower(): row["version"] for row in rows}


@pytest.mark.timeout(900)
def test_fresh_venv_non_editable_install_at_the_floors_serves(tmp_path: Path) -> None:
    floors = declared_floors()
    assert set(floors) == set(PINNED), floors
    constraints = tmp_path / "floors.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in floors.items()))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    pip, ditserve = str(venv / "bin" / "pip"), str(venv / "bin" / "ditserve")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DITSERVE_", "PYTHONPATH"))}

    # torch the way `make install` gets it, then the package with [serve], at the floors.
    # --no-compile: byte-compiling torch's sources at install took twice as long as the install itself.
    install_torch = ["bash", str(ROOT / "scripts" / "install-torch.sh"), pip, "--no-compile"]
    run(install_torch, tmp_path, env={**env, "TORCH_VERSION": "2.13.0"})
    run([pip, "install", "-q", "--no-compile", "-c", str(constraints), f"{ROOT}[serve]"], tmp_path, env=env)
    versions = installed(pip, tmp_path)
    assert {name: versions.get(name) for name in PINNED} == floors
    assert run([ditserve, "--version"], tmp_path, env=env).stdout.strip() == f"ditserve {versions['ditserve']}"
    python = str(venv / "bin" / "python")
    code = "import ditserve, pathlib; print([p.name for p in pathlib.Path(ditserve.__file__).parent.glob('v1/*')])"
    shipped = run([python, "-c", code], tmp_path, env=env).stdout
    assert "pipeline.proto" in shipped and "denoiser.proto" in shipped  # the contract, for other languages
    # Byte-compile what the services import once, here, rather than in three stages at once.
    warm = "import ditserve.services.serve, ditserve.services.gateway.http, diffusers, transformers, torch"
    run([python, "-c", warm], tmp_path, env=env)

    up = subprocess.Popen(
        [ditserve, "up", "--free-ports", "--start-timeout", "300"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        lines = read_until_ready(up, 360)
        output = "".join(lines)
        assert lines and lines[-1].startswith("ready:"), output
        target = re.search(r"--target (\S+)", lines[-1]).group(1)
        http_base = re.search(r"http\s+(http://\S+/v1)", output).group(1)
        out = tmp_path / "out.png"
        generated = run(
            [ditserve, "generate", "a red circle on a blue background", "--target", target, "--steps", "4",
             "--seed", "1", "--width", "64", "--height", "64", "-o", str(out)],
            tmp_path,
            env=env,
            timeout=300,
        )  # fmt: skip
        assert "wrote" in generated.stdout
        denoiser = re.search(r"denoiser\s+grpc (\S+)", output).group(1)
        info = json.loads(run([ditserve, "info", "--target", denoiser], tmp_path, env=env).stdout)
        assert info["model"].startswith(str(venv)) and info["model"].endswith("ditserve/models/shapes-flux")
        assert Image.open(out).size == (64, 64)
        body = {"prompt": "a red circle on a blue background", "size": "64x64", "seed": 1, "num_inference_steps": 4}
        status, answer = http_call(f"{http_base}/images/generations", body)
        assert status == 200, answer
        assert base64.b64decode(answer["data"][0]["b64_json"]) == out.read_bytes()  # HTTP = gRPC, byte for byte
        assert Image.open(io.BytesIO(out.read_bytes())).format == "PNG"
    finally:
        stop_process(up, signal.SIGINT, timeout=90)
    assert up.returncode == 0, "".join(lines) + (up.stdout.read() if up.stdout else "")
