"""The layering the architecture promises, checked on the real import graph.

Thin roles import no torch (the gateway, the client, and the denoiser's pure logic: batch scheduler,
cache policies, engine, model facts, family registry), and no module of a serving role imports the CLI
or an offline tool. Each import runs in a fresh interpreter, so nothing already loaded hides a
dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ditserve.client.config import repo_root

SERVICES = repo_root() / "services"
TORCH_FREE = [
    "ditserve.services.gateway.service",
    "ditserve.client",
    "ditserve.client.cli",
    "ditserve.services.denoiser.batching",
    "ditserve.services.denoiser.cache.policy",
    "ditserve.services.denoiser.cache.step_masks",
    "ditserve.services.denoiser.engine",
    "ditserve.services.denoiser.facts",
    "ditserve.services.families",
]
SERVING_ROLES = ("common", "denoiser", "encoder", "vae", "gateway", "families")
FORBIDDEN = ("ditserve.client.cli", "ditserve.services.tools")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module: str) -> None:
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing {module} loads {loaded.strip()}"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def serving_files() -> list[Path]:
    return sorted(path for role in SERVING_ROLES for path in (SERVICES / role).rglob("*.py"))


def test_the_walk_sees_the_serving_roles() -> None:
    """Guards the next test against passing on an empty list (a moved folder)."""
    files = serving_files()
    assert len(files) > 30
    assert any("ditserve.services.denoiser.engine" in imported_modules(path) for path in files)


@pytest.mark.parametrize("path", serving_files(), ids=lambda path: str(path.relative_to(SERVICES)))
def test_no_serving_module_imports_the_cli_or_a_tool(path: Path) -> None:
    bad = sorted(name for name in imported_modules(path) if name.startswith(FORBIDDEN))
    assert not bad, f"{path.relative_to(SERVICES)} imports {bad}"
