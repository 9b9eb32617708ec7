"""`ditserve up` hands its denoiser flags to the denoiser it starts: Info reports what was asked for."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from helpers import read_until_ready

from ditserve.client.launcher import stop_process

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "ditserve.client.cli"]


@pytest.mark.timeout(420)
def test_up_quantize_and_joint_cfg_reach_the_denoiser() -> None:
    up = subprocess.Popen(
        [
            *CLI,
            "up",
            "--free-ports",
            "--no-http",
            "--device",
            "cpu",
            "--quantize",
            "int8-weight",
            "--joint-cfg",
            "always",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        lines = read_until_ready(up, 300)
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        denoiser = re.search(r"denoiser\s+grpc (\S+)", "".join(lines)).group(1)
        info = subprocess.run([*CLI, "info", "--target", denoiser], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        details = json.loads(info.stdout)["details"]
        assert details["quantize"] == "int8-weight"
        assert details["joint_cfg"] == "always"
        assert int(details["quantized_linears"]) > 0
        assert details["attention"].startswith("auto chose torch_sdpa")  # the reason, in Info
    finally:
        stop_process(up, signal.SIGINT, timeout=90)
    assert up.returncode == 0, "".join(lines)
