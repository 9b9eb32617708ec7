"""The README's Python blocks and curl quickstart run as written against a live stack (ports swapped
for the test's), so its import paths, calls and commands stay true."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from ditserve.client.config import repo_root

pytestmark = pytest.mark.integration

README = (repo_root() / "README.md").read_text()


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def section(heading: str) -> str:
    """The README from `heading` to the next heading of any level."""
    start = README.index(heading)
    end = re.compile(r"^#{2,3} ", re.M).search(README, start + len(heading))
    return README[start : end.start() if end else None]


def on_test_ports(code: str, stack: object) -> str:
    http = stack.http_base.removeprefix("http://").removesuffix("/v1")
    return (
        code.replace("127.0.0.1:50050", stack.gateway)
        .replace("127.0.0.1:50052", stack.ports.address("denoiser"))
        .replace("127.0.0.1:8000", http)
    )


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(blocks("python")) >= 3
    assert any("curl" in block for block in blocks("bash", section("### OpenAI-compatible HTTP")))


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index: int, stack: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = on_test_ports(blocks("python")[index], stack)
    compiled = compile(code, f"README.md python block {index}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, {"__name__": "__readme__"})  # top-level `async with` makes a coroutine
    if inspect.iscoroutine(result):
        asyncio.run(result)
    if "out.png" in code:
        assert Image.open(tmp_path / "out.png").format == "PNG"


def test_curl_quickstart_runs(stack: object, tmp_path: Path) -> None:
    (script,) = [b for b in blocks("bash", section("### OpenAI-compatible HTTP")) if "curl" in b]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", on_test_ports(script, stack)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert '"status":"ok"' in result.stdout and '"id":"shapes-flux"' in result.stdout
    assert "event: image_generation.progress" in result.stdout
    assert "event: image_generation.completed" in result.stdout
    image = Image.open(tmp_path / "out.png")
    assert (image.format, image.size) == ("PNG", (64, 64))
