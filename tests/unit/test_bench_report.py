"""`ditserve bench report`: the README's benchmark table is the one generated from bench/results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditserve.services.tools.bench import report

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_tables_are_generated_from_the_committed_results() -> None:
    text = (ROOT / "README.md").read_text()
    assert report.generated_readme(text, ROOT / "bench" / "results", ROOT / "models", ROOT) == text, (
        "run `ditserve bench report`"
    )


def test_the_cache_table_lists_the_rows_the_summary_names() -> None:
    row = {"skipped_fraction": 0.5, "psnr_db": 36.0, "psnr_min_db": 26.0, "fidelity": None, "denoise_s": 0.1}
    document = {
        "command": "ditserve bench cache",
        "rows": [
            {**row, "name": "ours/none", "psnr_db": None, "skipped_fraction": 0.0, "speedup": 1.0},
            {**row, "name": "ours/whole-step k=8", "speedup": 3.2},
            {**row, "name": "diffusers/fbc t=0.05", "speedup": 1.5},
            {**row, "name": "ours/teacache t=0.1", "speedup": 1.4},
        ],
        "summary": {"best_row": "ours/whole-step k=8", "peer_best_row": "diffusers/fbc t=0.05", "rule": "r"},
    }
    text = report.cache_table(document)
    assert "`ours/none` | 0% | — |" in text and "| 36.0 dB (26.0) |" in text
    assert "`ours/whole-step k=8`" in text and "3.20x" in text and "`diffusers/fbc t=0.05`" in text
    assert "teacache" not in text, "a row the summary does not name"
    assert "Command: `ditserve bench cache`." in text


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


def test_the_serving_line_says_what_joining_decodes_would_save_and_change() -> None:
    summary = {
        "throughput_ratio_continuous": 3.4,
        "throughput_ratio_dynamic": 2.5,
        "p99_ratio_continuous": 0.5,
        "in_process_bound": {"batch": 8, "throughput_ratio": 4.0},
        "fraction_of_bound": 0.85,
    }
    document = {"bench": "serving", "config": {"steps": 20}, "summary": summary}
    assert "decodes joined" not in report.headline(document)  # a result from before the measure
    joined = {"batch": 8, "saved_fraction_of_request": 0.012, "outputs_identical": 5, "values_differing": 7}
    summary["vae_coalescing"] = {**joined, "max_difference": 1}
    line = report.headline(document)
    assert "3.40x" in line and "85% of it)" in line
    assert (
        "joined 8 to a call save 1.2% of a request's time and change 3 of 8 outputs (7 values, at most 1 level)" in line
    )
    summary["fraction_of_batched_throughput"] = 0.97
    assert "(in-process batch-8 bound 4.00x: 85% of it; 97% of its outputs/s)" in report.headline(document)
    assert not report.headline(document).startswith("6.8 req/s")
    summary["req_per_s_8_clients"] = {"off": 2.0, "dynamic": 5.0, "continuous": 6.8}
    assert report.headline(document).startswith("6.8 req/s at 8 clients (off 2.0): continuous batching 3.40x")
    assert "CPU per request" not in report.headline(document)  # a result from before the measure
    summary["vae_batch_size"] = {"off": 1.0, "continuous": 1.6}
    assert "the continuous stack's VAE decoded 1.60 requests per call" in report.headline(document)
    summary["cpu_ms_per_request_8_clients"] = {"continuous": {"denoiser": 130.2, "vae": 25.6, "total": 164.7}}
    summary["in_process_bound"]["batch8_cpu_ms_per_output"] = 107.5  # type: ignore[index]
    expected = "CPU per request at 8 clients 165 ms (denoiser 130, VAE 26) against 108 ms per output in-process"
    assert expected in report.headline(document)


def test_the_cache_line_gives_the_ratio_against_the_peers_hooks_in_our_loop_when_one_passes() -> None:
    summary = {
        "best_speedup_psnr30": 2.6,
        "best_row": "ours/whole-step k=9",
        "peer_best_speedup_psnr30": 1.6,
        "peer_best_row": "diffusers/magcache t=0.12",
        "ratio_vs_peer": 1.625,
        "peer_in_our_loop_best_speedup_psnr30": None,
        "peer_in_our_loop_best_row": None,
        "ratio_vs_peer_in_our_loop": None,
        "rule": "r",
    }
    document = {"bench": "cache", "config": {"steps": 28}, "summary": summary}
    assert "in our loop" not in report.headline(document)  # no peer row in our loop passed the rule
    summary.update(
        peer_in_our_loop_best_speedup_psnr30=1.4,
        peer_in_our_loop_best_row="diffusers@ours/magcache t=0.24",
        ratio_vs_peer_in_our_loop=2.6 / 1.4,
    )
    assert "; peers' hooks in our loop 1.40x (magcache t=0.24): ratio 1.86" in report.headline(document)


def test_the_transport_line_gives_the_middle_half_of_the_rounds_when_measured() -> None:
    summary = {
        "codec_decode_gbps": 6.6,
        "codec_encode_gbps": 3.0,
        "e2e_overhead_ratio": 1.04,
        "e2e_overhead_ratio_same_policy": 0.9,
        "e2e_all_identical": True,
    }
    document = {"bench": "transport", "config": {"pairs": 9, "steps": 20}, "summary": summary}
    assert "diffusers 1.04 (diffusers under the services' OpenMP policy: 0.90)" in report.headline(document)
    summary["e2e_overhead_ratio_quartiles"] = [0.98, 1.13]
    line = report.headline(document)
    assert "diffusers 1.04 (middle half of rounds 0.98-1.13; diffusers under the services' OpenMP policy: 0.90)" in line
    assert "outputs identical" in line
    summary.update(e2e_overhead_ratio_joint_cfg=0.72, e2e_joint_cfg_max_levels=1)
    assert report.headline(document).endswith(
        "outputs identical; with --joint-cfg always 0.72, outputs within 1/255 of in-process"
    )
