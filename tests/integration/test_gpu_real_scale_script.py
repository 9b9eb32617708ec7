"""bench/gpu_real_scale.sh, the GPU script, run on a CPU with the tiny preset: it writes its JSON, whole.

The same script and `ditserve bench real_scale` code the GPU run uses (only the preset, sizes and device
differ), so a change that breaks the GPU run fails here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 70+ s: make test-slow (CI runs it)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_tiny_preset_run_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "DITSERVE_REAL_SCALE_TINY": "1", "PYTHON": sys.executable}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_real_scale.sh"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / "gpu-real-scale.json").read_text())
    summary = document["summary"]
    assert summary["skipped"] == [], f"sections skipped on the tiny preset: {summary['skipped']}"
    assert document["config"]["weights"].startswith("random")
    assert summary["identical_outputs"], f"served vs in-process differ by {summary['max_abs_pixel_diff']}/255"
    assert summary["overhead_ratio"] > 0
    for role in ("encoder", "denoiser", "vae"):
        assert summary["memory_bytes"][role]["host_rss"] > 0
    rows = document["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"a", "b", "c", "d", "e", "g", "h"}
    wan = summary["wan"]  # the tiny Wan preset's clip, served vs WanPipeline in-process
    assert wan["identical_outputs"], f"Wan served vs in-process differ by {wan['max_abs_pixel_diff']}/255"
    assert {row["what"] for row in rows if row["section"] == "g"} == {"four services", "WanPipeline in-process"}
    assert "attention torch_sdpa" in {row["what"] for row in rows if row["section"] == "h"}
    assert {row["clients"] for row in rows if row["section"] == "e"} == {1, 2}
    assert all("errors" not in row for row in rows), rows
    assert {row["what"] for row in rows if row["section"] == "c"} == {"eager", "int8-weight"}
