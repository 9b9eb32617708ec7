"""`ditserve bench report`: the README's benchmark table is the one generated from bench/results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditserve.services.tools.bench import report

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_generated_from_the_committed_results() -> None:
    text = (ROOT / "README.md").read_text()
    generated = report.table(ROOT / "bench" / "results", ROOT / "models", ROOT)
    assert report.replace_between_markers(text, generated) == text, "run `ditserve bench report`"


def _write(folder: Path, name: str, model: str, command: str | None = None) -> None:
    document = {
        "bench": "sp",
        "machine": {"cpu_count": 2},
        "model": model,
        "summary": {"max_abs_error": 1e-7, "bytes_match_formula": True},
    }
    if command:
        document["command"] = command
    (folder / f"{name}.json").write_text(json.dumps(document))


def test_results_on_models_outside_the_repository_are_left_out(tmp_path: Path) -> None:
    _write(tmp_path, "shipped", str(ROOT / "models" / "shapes-flux"), "ditserve bench sp --out x.json")
    _write(tmp_path, "hub", "black-forest-labs/FLUX.1-dev")
    _write(tmp_path, "elsewhere", "/somewhere/tiny-flux")
    text = report.table(tmp_path, ROOT / "models", tmp_path)
    assert "[shipped](shipped.json)" in text and "`ditserve bench sp --out x.json`" in text
    assert "[hub](hub.json)" in text and "not recorded" in text
    assert "[elsewhere]" not in text and "`elsewhere.json` (model `/somewhere/tiny-flux`)" in text
    with pytest.raises(ValueError, match="bench-report"):
        report.replace_between_markers("no markers", text)
