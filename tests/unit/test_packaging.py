"""The install contract: fresh stubs, a client without torch, a CLI that explains itself."""

from __future__ import annotations

import subprocess
import sys

from ditserve.client.config import repo_root


def test_checked_in_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(repo_root() / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_client_and_cli_import_without_torch() -> None:
    code = (
        "import sys, ditserve.client, ditserve.client.cli as cli; cli.build_parser();"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_lists_every_command() -> None:
    result = subprocess.run([sys.executable, "-m", "ditserve.client.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("serve", "up", "demo", "generate", "info", "make-tiny-model", "bench"):
        assert command in result.stdout
