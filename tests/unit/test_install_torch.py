"""scripts/install-torch.sh picks the torch build a machine can use; a fake pip and nvidia-smi drive it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditserve.client.config import repo_root

SCRIPT = repo_root() / "scripts" / "install-torch.sh"
FAKE_PIP = """#!/usr/bin/env bash
if [ "$1" = show ]; then
    [ -n "$FAKE_INSTALLED" ] && printf 'Name: torch\\nVersion: %s\\n' "$FAKE_INSTALLED" && exit 0
    exit 1
fi
case " $* " in
*" --dry-run "*) printf '{"install": [{"metadata": {"name": "torch", "version": "%s"}}]}' "$FAKE_RESOLVED" ;;
*) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""


def install(tmp_path: Path, gpu: bool, resolved: str = "2.13.0", installed: str = "", **env: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "pip").write_text(FAKE_PIP)
    (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\nexit {0 if gpu else 1}\n")
    for tool in ("pip", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DRY_RUN": "1",
        "FAKE_RESOLVED": resolved,
        "FAKE_INSTALLED": installed,
        **env,
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), str(bin_dir / "pip"), "--no-compile"], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="the CPU-index branch is Linux's")
def test_without_a_gpu_the_cpu_build_comes_from_pytorchs_cpu_index(tmp_path: Path) -> None:
    line = install(tmp_path, gpu=False, resolved="2.13.0")
    assert line.endswith(
        "install -q --no-compile torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu"
    )


def test_without_a_gpu_a_configured_cpu_build_is_used_as_is(tmp_path: Path) -> None:
    line = install(tmp_path, gpu=False, resolved="2.13.0+cpu")
    assert line.endswith("install -q --no-compile torch==2.13.0+cpu") and "extra-index-url" not in line


def test_with_a_gpu_pypis_default_cuda_build(tmp_path: Path) -> None:
    line = install(tmp_path, gpu=True)
    assert line.endswith("install -q --no-compile torch==2.13.0") and "index" not in line


def test_an_installed_torch_of_that_version_stays(tmp_path: Path) -> None:
    assert install(tmp_path, gpu=False, installed="2.13.0+cpu") == "install-torch: torch 2.13.0+cpu already installed"


def test_torch_index_picks_another_build(tmp_path: Path) -> None:
    line = install(tmp_path, gpu=False, TORCH_INDEX="https://download.pytorch.org/whl/cu128")
    assert line.endswith("torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cu128")
