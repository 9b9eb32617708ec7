"""`ditserve bench cache`: its row grid, its metrics, and minimal runs on the shipped tiny model and the tiny Wan."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ditserve.services.denoiser.cache.policy import mask_bins
from ditserve.services.denoiser.cache.step_masks import stored_masks
from ditserve.services.tools.bench import cache, cache_rows, image_metrics
from ditserve.services.tools.calibrate import calibration_prompts
from ditserve.services.tools.prompt_file import SHAPES, VOCABULARIES

CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def test_fn_settings_scale_with_depth() -> None:
    assert cache_rows.depth_scaled_fn(57) == [1, 4, 8]  # cache-dit's FLUX.1 settings at FLUX.1's depth
    assert cache_rows.depth_scaled_fn(3) == [1, 2]  # the tiny model: a middle block is always left
    assert cache_rows.depth_scaled_fn(2) == [1]


def test_cache_dit_rows_mirror_ours() -> None:
    rows = cache_rows.all_rows(57)
    names = [row.name for row in rows]
    assert len(names) == len(set(names))
    ours = {row.name.removeprefix("ours/"): row.cache for row in rows if row.peer == "ours"}
    mirrored = [row for row in rows if row.peer == "cache-dit"]
    assert mirrored and all(ours[row.name.removeprefix("cache-dit/")] == row.cache for row in mirrored)
    assert sum(row.method == "teacache" for row in rows) >= 4


def test_whole_step_rows_ask_for_the_models_calibrated_masks() -> None:
    rows = [row for row in cache_rows.all_rows(3) if row.method == "whole-step"]
    assert [row.cache.dbcache.scm.computed_steps for row in rows] == list(cache_rows.WHOLE_STEP_COMPUTED)  # type: ignore[union-attr]
    assert all(row.cache.dbcache.fn == row.cache.dbcache.bn == 0 for row in rows)  # type: ignore[union-attr]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_whole_step_rows_forecast_as_the_masks_were_searched(order: int) -> None:
    rows = [row for row in cache_rows.all_rows(3, order) if row.method == "whole-step"]
    orders = {row.cache.dbcache.taylorseer.order if row.cache.dbcache.taylorseer else 0 for row in rows}  # type: ignore[union-attr]
    assert orders == {order}
    assert all(("+taylorseer" in row.name) == (order > 0) for row in rows)


def test_row_patterns_keep_both_baselines_and_reject_typos() -> None:
    rows = cache_rows.all_rows(3)
    chosen = [row.name for row in cache_rows.select_rows(rows, "ours/teacache t=0.4")]
    assert chosen == ["ours/none", "diffusers/none", CONTROL_ROW, "ours/teacache t=0.4"]
    with pytest.raises(SystemExit, match="no row matches"):
        cache_rows.select_rows(rows, "ours/teacache t=9")


def test_bench_prompts_are_fixed_and_never_calibration_prompts() -> None:
    excluded, vocabulary = calibration_prompts(), VOCABULARIES[SHAPES]()
    chosen = cache_rows.bench_prompts(12, excluded, vocabulary)
    assert chosen == cache_rows.bench_prompts(12, excluded, vocabulary)
    assert [seed for _, seed in chosen] == list(range(12))
    everything = cache_rows.bench_prompts(None, excluded, vocabulary)
    assert everything[:12] == chosen  # the timed prompts are the start of the quality prompts
    assert len({prompt for prompt, _ in everything}) == len(everything) == 140 - len(excluded)
    assert not {prompt for prompt, _ in everything} & set(excluded)
    with pytest.raises(SystemExit, match="bench prompts"):
        cache_rows.bench_prompts(len(everything) + 1, excluded, vocabulary)


def test_the_shapes_prompts_are_the_default_only_for_shapes_models(tmp_path: Path) -> None:
    shapes = {"prompt_vocabulary": "shapes"}
    chosen, calibration = cache.prompt_sets(None, 5, shapes, tmp_path)
    assert calibration == calibration_prompts()
    assert chosen == cache_rows.bench_prompts(5, calibration_prompts(), VOCABULARIES[SHAPES]())
    with pytest.raises(SystemExit, match="--prompt-file"):
        cache.prompt_sets(None, 5, {"family": "flux"}, tmp_path)
    with pytest.raises(SystemExit, match=r"'unheard-of'.*--prompt-file"):  # a vocabulary no table row knows
        cache.prompt_sets(None, 5, {"family": "wan", "prompt_vocabulary": "unheard-of"}, tmp_path)
    file = tmp_path / "mine.txt"
    file.write_text("".join(f"{seed}\tprompt {seed}\n" for seed in range(6)))
    chosen, calibration = cache.prompt_sets(str(file), 5, {"family": "flux"}, tmp_path)
    assert chosen == [(f"prompt {seed}", seed) for seed in range(5)]
    assert calibration == [f"prompt {seed}" for seed in range(cache.FILE_CALIBRATION_PROMPTS)]


@pytest.mark.parametrize("peer_row", ["taylorseer-lite i=2", "magcache t=0.24"])
def test_a_peers_hooks_run_in_our_loop_and_leave_it_as_it_was(model_dir: Path, peer_row: str) -> None:
    """A peer's hooks skip blocks in our loop (MagCache with the ratios its calibration measured in the
    pipeline); removed, our loop gives its own latents again."""
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.tools.bench.cache_harness import OurHarness, PipelineHarness
    from ditserve.services.tools.local_model import LocalModel

    model = LocalModel(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    prompt = model.encode("a red circle on a blue background")
    harness = OurHarness(model, steps=8, mag_ratios=PipelineHarness(model, steps=8).calibrate_magcache([prompt]))
    rows = {row.name: row for row in cache_rows.all_rows(model.runner.executor.num_blocks)}
    plain, peer = rows["ours/none"], rows[f"{cache_rows.PEER_IN_OURS}/{peer_row}"]
    _, before, _ = harness.run(plain, prompt, 1)
    harness.install(peer)
    try:
        _, hooked, skipped = harness.run(peer, prompt, 1)
        _, again, _ = harness.run(peer, prompt, 1)
    finally:
        harness.uninstall(peer)
    _, after, _ = harness.run(plain, prompt, 1)
    assert 0 < skipped < 1 and not torch.equal(hooked, before)
    assert torch.equal(hooked, again)  # the hooks' state is reset between images
    assert torch.equal(after, before)


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    assert image_metrics.psnr(image, image) == image_metrics.PSNR_CAP_DB
    assert image_metrics.ssim(image, image) == pytest.approx(1.0)
    assert 25 < image_metrics.psnr(noisy, image) < 35
    assert image_metrics.ssim(noisy, image) == pytest.approx(image_metrics.ssim(image, noisy))
    assert 0 < image_metrics.ssim(noisy, image) < 1


def _result(
    name: str, speedup: float, psnr: float | None, fidelity: float | None, worst: float | None = None, **extra: Any
) -> dict[str, Any]:
    peer, method = name.split("/")[0], "none" if name.endswith("/none") else "x"
    method = "fewer-steps" if "fewer-steps" in name else method
    return {
        "name": name,
        "peer": peer,
        "method": extra.pop("method", method),
        "speedup": speedup,
        "psnr_db": psnr,
        "psnr_min_db": psnr if worst is None else worst,
        "fidelity": fidelity,
        "denoise_s": 1 / speedup,
        "quality_outputs": 40,
        **extra,
    }


def test_summary_rule() -> None:
    results = [
        _result("ours/none", 1.0, None, 90),
        _result("diffusers/none", 1.0, None, 90),
        _result("ours/a", 3.0, 29.9, 90),  # PSNR too low
        _result("ours/b", 2.5, 31, 87.5),  # fidelity 2.5 points down
        _result("ours/c", 2.2, 31, 88),
        _result("ours/ruined", 2.4, 33, 90, worst=19.9),  # its worst image under 20 dB
        _result("ours/fewer-steps 9", 2.9, 30.5, 90, params={"steps": 9}),  # a baseline, never the best row
        _result("ours/fewer-steps 8", 3.2, 28.0, 90, params={"steps": 8}),
        _result("ours/whole 9", 2.8, 29.0, 90, method="whole-step", params={"scm": {"computed_steps": 9}}),
        # as the bench writes it: the calibrated mask resolved to bins, 1 + 3 + 4 = 8 computed steps
        _result("ours/whole 8", 3.3, 27.0, 90, method="whole-step", params={"scm": {"compute_bins": [1, 3, 4]}}),
        _result("ours/whole 7", 3.6, 27.0, 90, method="whole-step", params={"scm": {"computed_steps": 7}}),
        _result("ours/fewer-steps 10", 2.6, 31.0, 90, params={"steps": 10}),
        # stopped by the quality pass after 12 outputs: a mean over other prompts than its baseline's
        _result(
            "ours/whole 10",
            2.7,
            33.0,
            90,
            worst=12.0,
            quality_outputs=12,
            method="whole-step",
            params={"scm": {"computed_steps": 10}},
        ),
        _result("ours/strict", 1.5, 36, 90, worst=26),
        _result("cache-dit/d", 2.0, 35, 90),
        _result("diffusers@ours/e", 1.6, 34, 90),  # the peer's hooks in our loop
        {"name": "diffusers/e", "peer": "diffusers", "method": "x", "error": "boom"},
    ]
    summary = cache.summarize(results, baseline_identical=True)
    assert summary["best_row"] == "ours/c" and summary["best_speedup_psnr30"] == 2.2
    assert summary["peer_best_row"] == "cache-dit/d"
    assert summary["ratio_vs_peer"] == pytest.approx(1.1)
    assert summary["fewer_steps_best_row"] == "ours/fewer-steps 9"
    assert summary["best_row_psnr35_worst25"] == "ours/strict"
    # at equal compute: the k=9 and k=8 whole-step rows against 9 and 8 steps outright; k=7 has no such row,
    # k=10 was stopped early
    margins = {"ours/whole 9": pytest.approx(-1.5), "ours/whole 8": pytest.approx(-1.0)}
    assert summary["equal_compute_margin_db"] == margins
    assert summary["min_equal_compute_margin_db"] == pytest.approx(-1.5)
    assert summary["ratio_vs_peer_in_our_loop"] == pytest.approx(2.2 / 1.6)
    assert summary["targets_met"] == {
        "best_speedup_psnr30": True,
        "ratio_vs_peer": False,
        "ratio_vs_peer_in_our_loop": True,
        "best_speedup_psnr35_worst25": False,
    }
    assert summary["errors"] == {"diffusers/e": "boom"}
    assert summary["timing_warning"] is None
    results[1] = _result("diffusers/none", 1.0, None, 90, denoise_s=1.5)
    assert "differ by 33%" in cache.summarize(results, baseline_identical=True)["timing_warning"]


CONTROL_ROW = f"ours/none nudged {cache_rows.CONTROL_NUDGE:g}"
WHOLE_STEP_ROW = "ours/whole-step calibrated k=9 +taylorseer"
FEWER_STEPS_ROW = "ours/fewer-steps 9"
PEER_IN_OURS_ROW = f"{cache_rows.PEER_IN_OURS}/magcache t=0.24"  # its ratios travel to the quality workers
RUN_ROWS = ["ours/teacache t=0.4", WHOLE_STEP_ROW, FEWER_STEPS_ROW, "diffusers/fbc t=0.2", PEER_IN_OURS_ROW] + (
    ["cache-dit/dbcache F1B0 r=0.24"] if CACHE_DIT else []
)
QUALITY_PROMPTS = 3  # one past the 2 timed prompts: the untimed quality pass runs too


@pytest.fixture(scope="module")
def minimal_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One minimal run (2 prompts, 1 round) shared by the checks below, at the model's 28 steps: the
    calibrated TeaCache coefficients hold for the per-step changes of that step count."""
    out = tmp_path_factory.mktemp("bench") / "cache.json"
    args = argparse.Namespace(
        model=str(model_dir),
        prompts=2,
        quality_prompts=QUALITY_PROMPTS,
        prompt_file=None,
        steps=None,
        repeats=1,
        rows=",".join(RUN_ROWS),
        quality_workers=2,  # the pass in worker processes, as on a 2-core machine by default
        device="cpu",
        dtype="fp32",
        out=str(out),
    )
    return out, cache.run(args)


def test_minimal_run_on_the_shipped_model(minimal_run: tuple[Path, dict[str, Any]], model_dir: Path) -> None:
    out, document = minimal_run
    json.dumps(document, allow_nan=False)  # a strict JSON document: no Infinity, no NaN
    results = {row["name"]: row for row in document["rows"]}
    assert list(results)[:3] == ["ours/none", "diffusers/none", CONTROL_ROW]
    assert set(results) == {*list(results)[:3], *RUN_ROWS}
    assert not document["summary"]["errors"]
    for name in ("ours/none", "diffusers/none"):
        assert results[name]["speedup"] == pytest.approx(1.0)
        assert results[name]["psnr_db"] is None and results[name]["skipped_fraction"] == 0.0
    for name in RUN_ROWS:
        row = results[name]
        assert row["denoise_s"] > 0 and 0 <= row["skipped_fraction"] < 1
        assert 0 < row["psnr_db"] <= image_metrics.PSNR_CAP_DB and 0 < row["ssim"] <= 1
        assert 0 <= row["fidelity"] <= 100
        assert 0 <= row["fidelity_lost"] + row["fidelity_gained"] <= QUALITY_PROMPTS
    assert results["ours/teacache t=0.4"]["skipped_fraction"] > 0 and results[PEER_IN_OURS_ROW]["skipped_fraction"] > 0
    for name in RUN_ROWS:  # every output made, or stopped at one that rules the row out
        row = results[name]
        assert row["quality_outputs"] == QUALITY_PROMPTS or row["psnr_min_db"] < cache.WORST_FLOOR_DB
    assert results[FEWER_STEPS_ROW]["quality_outputs"] == QUALITY_PROMPTS  # a baseline makes every output
    control = results[CONTROL_ROW]  # uncached, nudged: a small change, and nothing skipped
    assert control["skipped_fraction"] == 0.0 and 30 < control["psnr_db"] < image_metrics.PSNR_CAP_DB
    # The shipped model's calibrated 9-of-28 mask, resolved to bins: 19 of 28 whole steps skipped.
    masks = stored_masks(json.loads((model_dir / "ditserve.json").read_text()))
    assert tuple(results[WHOLE_STEP_ROW]["params"]["scm"]["compute_bins"]) == mask_bins(masks[28][9])[0]
    assert results[WHOLE_STEP_ROW]["skipped_fraction"] == pytest.approx(19 / 28)
    assert results[FEWER_STEPS_ROW]["skipped_fraction"] == pytest.approx(19 / 28)  # the same compute, 9 steps
    assert results[FEWER_STEPS_ROW]["params"] == {"steps": 9}
    assert len(document["config"]["prompts"]) == QUALITY_PROMPTS and document["config"]["timed_prompts"] == 2
    summary = document["summary"]
    assert summary["baselines_identical"]  # our loop is FluxPipeline's, bit for bit
    assert summary["teacache_coefficients_source"] == f"{model_dir.name}/ditserve.json"  # calibrated, shipped
    assert {"best_speedup_psnr30", "peer_best_speedup_psnr30", "ratio_vs_peer"} <= set(summary)
    assert Path(summary["plot"]) == out.with_suffix(".png") and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(not CACHE_DIT, reason="cache-dit is not installed: pip install 'ditserve[bench]'")
def test_minimal_run_has_a_cache_dit_row(minimal_run: tuple[Path, dict[str, Any]]) -> None:
    row = next(row for row in minimal_run[1]["rows"] if row["peer"] == "cache-dit")
    assert "error" not in row and row["psnr_db"] > 0
    assert row["params"]["fn"] == 1 and row["params"]["residual_diff_threshold"] == 0.24


WAN_STEPS = 8  # one more than the fewest fewer-steps row (7)
WAN_ROWS = [
    "ours/teacache t=0.4",
    "ours/fewer-steps 7",
    "ours/whole-step calibrated k=7 +taylorseer",
    "diffusers/fbc t=0.2",
    f"{cache_rows.PEER_IN_OURS}/taylorseer-lite i=2",
    "diffusers/magcache t=0.12",
    f"{cache_rows.PEER_IN_OURS}/magcache t=0.12",
] + (["cache-dit/dbcache F1B0 r=0.24"] if CACHE_DIT else [])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny Wan's ops are too small to split: one thread runs them in seconds where an OpenMP team on a
    loaded 2-core machine waits for its members for minutes (both harnesses alike)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_minimal_run_on_tiny_wan_compares_clips(wan_model: Path, tmp_path: Path) -> None:
    """Our rows, the fewer-steps baseline and the peers on WanPipeline, clips against uncached clips."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a blue background\n7\ta green square moving up on a black one\n")
    args = argparse.Namespace(
        model=str(wan_model),
        prompts=1,
        quality_prompts=1,
        prompt_file=str(prompts),
        steps=WAN_STEPS,
        repeats=1,
        rows=",".join(WAN_ROWS),
        quality_workers=1,  # the pass in this process
        device="cpu",
        dtype="fp32",
        out=None,
    )
    document = cache.run(args)

    json.dumps(document, allow_nan=False)
    results = {row["name"]: row for row in document["rows"]}
    summary = document["summary"]
    assert summary["baselines_identical"]  # our loop is WanPipeline's, bit for bit
    # a model without calibrated masks: its whole-step row says so, and the bench goes on
    assert set(summary["errors"]) == {"ours/whole-step calibrated k=7 +taylorseer"}
    assert "calibrate step-mask" in summary["errors"]["ours/whole-step calibrated k=7 +taylorseer"]
    for name in set(WAN_ROWS) - set(summary["errors"]):
        row = results[name]
        assert row["denoise_s"] > 0 and 0 <= row["skipped_fraction"] < 1
        assert 0 < row["psnr_db"] <= image_metrics.PSNR_CAP_DB and 0 < row["ssim"] <= 1
        assert row["fidelity"] is None  # clips are not judged
    assert results["ours/fewer-steps 7"]["skipped_fraction"] == pytest.approx(1 / WAN_STEPS)
    assert results["diffusers/magcache t=0.12"]["skipped_fraction"] > 0 and len(summary["magcache_ratios"]) == WAN_STEPS
    assert results[f"{cache_rows.PEER_IN_OURS}/magcache t=0.12"]["skipped_fraction"] > 0
    assert summary["teacache_coefficients_source"] == "fitted in the bench"  # the tiny Wan has none stored
    assert set(summary) >= {"best_speedup_psnr30", "peer_best_speedup_psnr30", "ratio_vs_peer", "fewer_steps_best_row"}
    config = document["config"]
    assert config["family"] == "wan" and config["num_frames"] == 9 and not config["fidelity_judged"]


def test_a_clip_is_compared_as_its_frames() -> None:
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    other = clip.copy()
    other[1] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # one frame of three differs
    frames = [image_metrics.ssim(a, b) for a, b in zip(other, clip, strict=True)]
    assert image_metrics.ssim(other, clip) == pytest.approx(np.mean(frames)) and frames[0] == pytest.approx(1.0)
    assert image_metrics.psnr(other, clip) == pytest.approx(image_metrics.psnr(other[1], clip[1]) + 10 * np.log10(3))
