"""`ditserve bench cache`: our step caching beside its peers, on one model, one prompt set, the same seeds.

Any family (FLUX images, Wan clips): the model is a LocalModel (local_model.py), the roles' own code
paths in this process. Rows, their names and prompts: cache_rows.py. Harnesses and timing:
cache_harness.py. PSNR and SSIM: image_metrics.py. The plot: cache_plot.py.

TeaCache uses the model's calibrated coefficients (ditserve.json "teacache_coefficients", written by
`ditserve calibrate teacache`, tools/calibrate.py); a folder without them gets them fitted here, the same
way, not saved. The bench's prompts (a seeded subset of the model's evaluation prompts, seed i for prompt
i) never include the calibration prompts. Settings are the model folder's defaults, classic CFG (FLUX's
true CFG, Wan's guidance) with negative prompt "" above 1, as the gateway sends it.

Quality, over the quality set: the timed prompts' first-round outputs, then one untimed pass of every row
over the other prompts (cache_quality.py: in --quality-workers processes; a cached row stops at its first
output under the worst-output floor, which rules it out of the summary whatever follows, and reports
`quality_outputs`, the outputs its quality figures are over). Outputs are decoded by the family's VAE
decoder as the VAE service decodes: PSNR and SSIM (Gaussian 11x11 window, sigma 1.5, per RGB channel)
against the uncached image or clip of the same prompt and seed in the same harness (a clip is its frames:
PSNR over all of them, SSIM their mean), and, for images, prompt fidelity (eval/fidelity.py: all attributes
right, in points, with the prompts it loses and gains against that uncached image). A row's PSNR is the mean
of its per-output PSNRs, each capped at PSNR_CAP_DB (identical outputs); its worst is the lowest of them.

Prompts: the evaluation prompts of the vocabulary the model was trained on (ditserve.json
"prompt_vocabulary", prompt_file.py), else --prompt-file, which any model may use. Fidelity is judged
only on images and only when every prompt is a shapes prompt; elsewhere PSNR, SSIM and the worst output
against uncached decide.

Summary: ours and the peers each get the highest speedup among cached rows with mean PSNR >= 30 dB, the
worst image >= 20 dB and (where judged) fidelity at most 2 points below uncached; ratio_vs_peer divides
the two, and ratio_vs_peer_in_our_loop divides ours by the peer's hooks timed in our loop (both against
ours/none, so harness overhead cancels). The same rule picks the best uncached fewer-steps row, the
baseline any step cache must beat, and best_speedup_psnr35_worst25 is the fastest cached row with mean
>= 35 dB and worst >= 25 dB. A row that fails keeps its error and stays out of the summary. A
speedup-vs-PSNR scatter plot is written next to the JSON as <out>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ditserve.client.config import add_model_argument
from ditserve.services.common.device import add_arguments as add_device_arguments
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.cache.step_masks import mask_forecast_order, mask_orders, resolve, stored_masks
from ditserve.services.tools.bench.cache_harness import OurHarness, PipelineHarness
from ditserve.services.tools.bench.cache_plot import plot
from ditserve.services.tools.bench.cache_quality import ModelSpec, Scorer, score_rows
from ditserve.services.tools.bench.cache_rows import (
    BASELINES,
    PEER_IN_OURS,
    UNCACHED,
    Row,
    all_rows,
    bench_prompts,
    select_rows,
)
from ditserve.services.tools.bench.common import median, result_document
from ditserve.services.tools.bench.image_metrics import psnr, ssim
from ditserve.services.tools.eval.fidelity import score_image
from ditserve.services.tools.prompt_file import read_prompts, shapes_vocabulary, vocabulary_prompts

if TYPE_CHECKING:
    from ditserve.services.tools.local_model import LocalModel
    from ditserve.v1.encoder_pb2 import PromptEmbedding

PSNR_FLOOR_DB = 30.0
WORST_FLOOR_DB = 20.0  # no row whose worst image or clip is ruined heads the summary
STRICT_RULE_DB = (35.0, 25.0)  # mean and worst PSNR of the tail target: best_speedup_psnr35_worst25
FIDELITY_SLACK = 2.0  # points of fidelity a cached row may lose against uncached
BASELINE_TOLERANCE = 0.1  # the two uncached baselines may differ by this much before timings are flagged
FILE_CALIBRATION_PROMPTS = 4
TARGETS = {"best_speedup_psnr30": 2.0, "ratio_vs_peer": 1.3, "best_speedup_psnr35_worst25": 3.5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device_arguments(parser)
    add_model_argument(parser)
    parser.add_argument("--prompts", type=int, default=10, help="timed prompts, a round each (default: 10)")
    parser.add_argument(
        "--quality-prompts",
        type=int,
        help="prompts whose images are scored, the timed ones first (default: every evaluation prompt not used"
        " for calibration, or every prompt of --prompt-file)",
    )
    parser.add_argument(
        "--prompt-file",
        help="prompts like yours, one per line, optionally 'SEED<TAB>PROMPT' (default: the evaluation prompts of"
        " the vocabulary the model was trained on, for such models only)",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's default_steps)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default: 3)")
    parser.add_argument(
        "--quality-workers",
        type=int,
        help="processes for the untimed quality pass, the threads shared out between them (default: 2 on a"
        " CPU with 2 or more cores, else 1; 1 runs it in this process)",
    )
    parser.add_argument(
        "--rows",
        help="comma-separated name patterns (fnmatch) of the rows to run, e.g. 'ours/teacache*,diffusers/*';"
        " default: all",
    )


def _installed_runs(
    row: Row, harness: OurHarness | PipelineHarness, prompts: Sequence[tuple[PromptEmbedding, int]]
) -> list[tuple[float, Any, float]]:
    """The row's (seconds, latents, skipped) per timed prompt, after one untimed warm-up, its hooks installed
    for them and removed after."""
    harness.install(row)
    try:
        harness.run(row, *prompts[0])  # untimed: whatever a first call after installing costs
        return [harness.run(row, prompt, seed) for prompt, seed in prompts]
    finally:
        harness.uninstall(row)


def _fail(row: Row, error: Exception) -> None:
    """A row that cannot run is reported, never dropped."""
    row.error = f"{type(error).__name__}: {error}"
    row.latents = []


def _check_baselines(rows: list[Row]) -> None:
    failed = [row.error for row in rows if row.name in BASELINES.values() and row.error is not None]
    if failed:
        raise RuntimeError(f"an uncached baseline failed, nothing compares: {failed}")


def _run_row(
    row: Row,
    harness: OurHarness | PipelineHarness,
    prompts: Sequence[tuple[PromptEmbedding, int]],
    first: bool,
) -> None:
    import torch

    results = _installed_runs(row, harness, prompts)
    if first:
        row.seconds = [[seconds] for seconds, _, _ in results]
        row.latents = [latents for _, latents, _ in results]
        row.skipped = [skipped for _, _, skipped in results]
    else:
        for samples, (seconds, _, _) in zip(row.seconds, results, strict=True):
            samples.append(seconds)
        row.deterministic &= all(
            torch.equal(latents, kept) for (_, latents, _), kept in zip(results, row.latents, strict=True)
        )


def _measure(
    rows: list[Row],
    harnesses: dict[str, OurHarness | PipelineHarness],
    prompts: Sequence[tuple[PromptEmbedding, int]],
    repeats: int,
) -> None:
    """Every row over every prompt, each round starting one row later; a row that fails stops there."""
    bar = tqdm(total=repeats * len(rows), desc="rows x rounds", unit="row")
    for round_index in range(repeats):
        start = round_index % len(rows)
        for row in rows[start:] + rows[:start]:
            bar.update()
            if row.error is not None:
                continue
            try:
                _run_row(row, harnesses[row.harness], prompts, first=round_index == 0)
            except Exception as error:
                _fail(row, error)
    bar.close()
    _check_baselines(rows)


def _score_rest(
    rows: list[Row],
    prompts: Sequence[tuple[str, int]],
    images: dict[str, dict[int, np.ndarray]],
    scorer: Scorer,
    spec: ModelSpec,
    workers: int | None,
) -> None:
    """The untimed quality pass (cache_quality.py): each row's pixels past the timed prompts join `images`
    (by position in the quality set: the timed prompts first)."""
    import torch

    if not prompts:
        return
    if workers is None:  # on CPU two processes nearly double the pass; one GPU is not shared out
        workers = 2 if scorer.model.device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    if workers < 1:
        raise SystemExit(f"--quality-workers must be at least 1, got {workers}")
    spec = dataclasses.replace(spec, threads=max(1, torch.get_num_threads() // workers))
    running = [row for row in rows if row.error is None]
    timed = {row.name: list(images[row.name].values()) for row in running}
    scored, failed = score_rows(running, prompts, timed, WORST_FLOOR_DB, scorer, spec, workers)
    offset = len(next(iter(timed.values())))
    for row in running:
        if row.name in failed:
            _fail(row, failed[row.name])
            del images[row.name]
        else:
            images[row.name].update({offset + i: pixels for i, pixels in scored[row.name].pixels.items()})
            row.skipped += scored[row.name].skipped
    _check_baselines(rows)


def _denoise_seconds(row: Row) -> float:
    """Per image: the mean over prompts of each prompt's median over rounds."""
    return float(np.mean([median(samples) for samples in row.seconds]))


def _row_results(
    row: Row, baselines: dict[str, Row], images: dict[str, dict[int, np.ndarray]], prompts: list[str], judged: bool
) -> dict[str, Any]:
    """Timing, skipped compute and quality against the harness's uncached images; fidelity when `judged`."""
    result: dict[str, Any] = {"name": row.name, "peer": row.peer, "method": row.method, "params": row.params}
    if row.error is not None:
        return {**result, "error": row.error}
    baseline = baselines[row.harness]
    ran = sorted(images[row.name])  # every prompt, or those a row stopped early ran
    own = [images[row.name][i] for i in ran]
    reference = [images[baseline.name][i] for i in ran]
    prompts = [prompts[i] for i in ran]
    reference_row = row is baseline
    psnrs = [psnr(image, ref) for image, ref in zip(own, reference, strict=True)]
    denoise_s = _denoise_seconds(row)
    fidelity: dict[str, Any] = {"fidelity": None, "fidelity_lost": None, "fidelity_gained": None}
    if judged:
        passed, passed_uncached = _passes(own, prompts), _passes(reference, prompts)
        fidelity = {
            "fidelity": 100 * float(np.mean(passed)),
            "fidelity_lost": sum(was and not now for was, now in zip(passed_uncached, passed, strict=True)),
            "fidelity_gained": sum(now and not was for was, now in zip(passed_uncached, passed, strict=True)),
        }
    return {
        **result,
        "denoise_s": denoise_s,
        "denoise_s_rounds": [float(np.mean(round_)) for round_ in zip(*row.seconds, strict=True)],
        "speedup": _denoise_seconds(baseline) / denoise_s,
        "skipped_fraction": float(np.mean(row.skipped)),
        "psnr_db": None if reference_row else float(np.mean(psnrs)),
        "psnr_min_db": None if reference_row else min(psnrs),
        "ssim": None if reference_row else float(np.mean([ssim(i, r) for i, r in zip(own, reference, strict=True)])),
        "quality_outputs": len(own),
        **fidelity,
        "deterministic": row.deterministic,
    }


def _passes(images: list[np.ndarray], prompts: list[str]) -> list[bool]:
    """Per image: does it show every attribute its prompt asks for (eval/fidelity.py)?"""
    return [score_image(Image.fromarray(image), prompt)["all"] for image, prompt in zip(images, prompts, strict=True)]


def _best(
    results: list[dict[str, Any]],
    peers: set[str],
    fidelity_none: float | None,
    floors: tuple[float, float] = (PSNR_FLOOR_DB, WORST_FLOOR_DB),
    methods: set[str] | None = None,
) -> dict[str, Any] | None:
    """The fastest row of these peers (cached ones unless `methods` names others) whose mean and worst PSNR
    reach `floors` and, where fidelity is judged, whose fidelity is within the slack of uncached."""
    eligible = [
        r
        for r in results
        if r["peer"] in peers
        and (r["method"] in methods if methods is not None else r["method"] not in UNCACHED)
        and "error" not in r
        and r["psnr_db"] is not None
        and r["psnr_db"] >= floors[0]
        and r["psnr_min_db"] >= floors[1]
        and (fidelity_none is None or r["fidelity"] >= fidelity_none - FIDELITY_SLACK)
    ]
    return max(eligible, key=lambda r: r["speedup"], default=None)


def equal_compute_margins(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each whole-step row's mean PSNR minus that of asking for its k steps outright (the fewer-steps row
    of the same compute), by row name: what caching buys over the scheduler's own shorter schedule. Only
    over the same outputs: a row the quality pass stopped early has no margin."""
    fewer = {
        r["params"]["steps"]: r
        for r in results
        if r["method"] == "fewer-steps" and "error" not in r and r["psnr_db"] is not None
    }
    margins = {}
    for r in results:
        if r["method"] != "whole-step" or "error" in r or r["psnr_db"] is None:
            continue
        baseline = fewer.get(_computed_steps(r["params"]["scm"]))
        if baseline is not None and baseline["quality_outputs"] == r["quality_outputs"]:
            margins[r["name"]] = r["psnr_db"] - baseline["psnr_db"]
    return margins


def _computed_steps(scm: dict[str, Any]) -> int:
    """A whole-step row's computed steps: its calibrated mask reaches the results resolved to bins."""
    return scm["computed_steps"] if scm.get("computed_steps") is not None else sum(scm["compute_bins"])


def summarize(results: list[dict[str, Any]], baseline_identical: bool) -> dict[str, Any]:
    by_name = {r["name"]: r for r in results}
    ours_none, pipe_none = by_name[BASELINES["ours"]], by_name[BASELINES["pipeline"]]
    fidelity_none = ours_none["fidelity"]
    ours = _best(results, {"ours"}, fidelity_none)
    peer = _best(results, {"cache-dit", "diffusers"}, pipe_none["fidelity"])
    strict = _best(results, {"ours"}, fidelity_none, STRICT_RULE_DB)
    in_ours = _best(results, {PEER_IN_OURS}, fidelity_none)
    fewer = _best(results, {"ours"}, fidelity_none, methods={"fewer-steps"})
    margins = equal_compute_margins(results)
    best = ours["speedup"] if ours else None
    ratio_in_ours = best / in_ours["speedup"] if best is not None and in_ours is not None else None
    peer_best = peer["speedup"] if peer else None
    ratio = best / peer_best if best is not None and peer_best is not None else None
    baseline_ratio = ours_none["denoise_s"] / pipe_none["denoise_s"]
    timing_warning = None
    if abs(baseline_ratio - 1) > BASELINE_TOLERANCE:  # both loops do the same work, bit for bit
        timing_warning = (
            f"the uncached baselines differ by {abs(baseline_ratio - 1):.0%}: timings are noisy (other"
            " load on this machine?) and speedups of the two harnesses do not compare"
        )
    summary: dict[str, Any] = {
        "best_speedup_psnr30": best,
        "best_row": ours["name"] if ours else None,
        "peer_best_speedup_psnr30": peer_best,
        "peer_best_row": peer["name"] if peer else None,
        "ratio_vs_peer": ratio,
        "peer_in_our_loop_best_speedup_psnr30": in_ours["speedup"] if in_ours else None,
        "peer_in_our_loop_best_row": in_ours["name"] if in_ours else None,
        "ratio_vs_peer_in_our_loop": ratio_in_ours,
        "best_speedup_psnr35_worst25": strict["speedup"] if strict else None,
        "best_row_psnr35_worst25": strict["name"] if strict else None,
        "fewer_steps_best_speedup_psnr30": fewer["speedup"] if fewer else None,
        "fewer_steps_best_row": fewer["name"] if fewer else None,
        "equal_compute_margin_db": margins,
        "min_equal_compute_margin_db": min(margins.values(), default=None),
        "targets": TARGETS,
        "targets_met": {
            "best_speedup_psnr30": best is not None and best >= TARGETS["best_speedup_psnr30"],
            "ratio_vs_peer": ratio is not None and ratio >= TARGETS["ratio_vs_peer"],
            "ratio_vs_peer_in_our_loop": ratio_in_ours is not None and ratio_in_ours >= TARGETS["ratio_vs_peer"],
            "best_speedup_psnr35_worst25": strict is not None
            and strict["speedup"] >= TARGETS["best_speedup_psnr35_worst25"],
        },
        "rule": f"cached, mean PSNR >= {PSNR_FLOOR_DB} dB, worst image/clip >= {WORST_FLOOR_DB} dB"
        + (f", fidelity >= uncached - {FIDELITY_SLACK}" if fidelity_none is not None else "")
        + "; the fewer-steps rows are its baseline, never its best",
        "fidelity_none": fidelity_none,
        "baseline_denoise_s": {"ours": ours_none["denoise_s"], "pipeline": pipe_none["denoise_s"]},
        "baseline_ratio_ours_vs_pipeline": baseline_ratio,
        "timing_warning": timing_warning,
        "baselines_identical": baseline_identical,
        "errors": {r["name"]: r["error"] for r in results if "error" in r},
        "nondeterministic": [r["name"] for r in results if r.get("deterministic") is False],
    }
    return summary


def prompt_sets(
    prompt_file: str | None, quality_prompts: int | None, sidecar: dict[str, Any], model: str | Path
) -> tuple[list[tuple[str, int]], list[str]]:
    """(bench prompts with seeds, calibration prompts): a prompt file's first --quality-prompts lines, its
    first FILE_CALIBRATION_PROMPTS calibrating what the bench must fit itself (MagCache, TeaCache without
    stored coefficients); else, for a model trained on a known vocabulary only, its evaluation prompts."""
    from ditserve.services.tools.calibrate import calibration_prompts

    if prompt_file:
        given = read_prompts(prompt_file)
        if quality_prompts is not None and not 1 <= quality_prompts <= len(given):
            raise SystemExit(f"{prompt_file} holds {len(given)} prompts, asked for {quality_prompts}")
        return given[:quality_prompts], [prompt for prompt, _ in given[:FILE_CALIBRATION_PROMPTS]]
    vocabulary = vocabulary_prompts(sidecar, model)
    calibration = calibration_prompts(vocabulary=vocabulary)
    return bench_prompts(quality_prompts, calibration, vocabulary), calibration


def _prepare_rows(rows: list[Row], model: LocalModel, steps: int, coefficients: Sequence[float] | None) -> None:
    """Each row's cache resolved for the model (TeaCache's coefficients, a calibrated mask), or its error:
    a peer that is not installed, a mask the model lacks, a fewer-steps count not under the bench's."""
    cache_dit_installed = importlib.util.find_spec("cache_dit") is not None
    masks, orders = stored_masks(model.folder.sidecar), mask_orders(model.folder.sidecar)
    for row in rows:
        if row.peer == "cache-dit" and not cache_dit_installed:
            row.error = "cache-dit is not installed: pip install 'ditserve[bench]'"
        if row.steps is not None and row.steps >= steps:
            row.error = f"{row.steps} steps is no fewer than the bench's {steps}"
        if row.cache.teacache is not None and coefficients is not None:
            row.cache = CacheConfig(dataclasses.replace(row.cache.teacache, coefficients=tuple(coefficients)))
        try:
            row.cache = resolve(row.cache, steps, masks, orders)
        except InvalidArgument as error:
            row.error = f"{error.field}: {error.reason}"


def _calibrate_magcache(rows: list[Row], pipelines: PipelineHarness, calibration: list[PromptEmbedding]) -> None:
    """MagCache's ratios from its own calibrate mode; if that cannot run on this model its rows say why."""
    magcache = [row for row in rows if row.method == "magcache" and row.error is None]
    if not magcache:
        return
    try:
        pipelines.calibrate_magcache(calibration)
    except Exception as error:
        for row in magcache:
            _fail(row, RuntimeError(f"MagCache's calibrate mode failed: {type(error).__name__}: {error}"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import __version__ as diffusers_version

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.tools.calibrate import COEFFICIENTS_KEY, fit_teacache
    from ditserve.services.tools.local_model import LocalModel

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # else it logs its whole config on every enable
    folder = ModelFolder(args.model)
    model = LocalModel.open(folder, args.device, args.dtype)
    steps = args.steps or folder.defaults.steps
    order = mask_forecast_order(folder.sidecar, steps)
    rows = select_rows(all_rows(model.runner.executor.num_blocks, order), args.rows)
    chosen, calibration = prompt_sets(args.prompt_file, args.quality_prompts, folder.sidecar, folder.path)
    if args.prompts > len(chosen):
        raise SystemExit(f"--prompts {args.prompts} is more than the {len(chosen)} quality prompts")
    texts = [prompt for prompt, _ in chosen]
    # the fidelity judge reads images of the shapes vocabulary only
    judged = not model.family.video and shapes_vocabulary(texts)
    coefficients = folder.sidecar.get(COEFFICIENTS_KEY)
    source = f"{folder.path.name}/ditserve.json"
    if coefficients is None and any(row.cache.teacache is not None for row in rows):
        coefficients, source = fit_teacache(model, calibration, steps).coefficients, "fitted in the bench"
    _prepare_rows(rows, model, steps, coefficients)

    pipelines = PipelineHarness(model, steps)
    _calibrate_magcache(rows, pipelines, [model.encode(prompt) for prompt in calibration])
    harnesses: dict[str, OurHarness | PipelineHarness] = {
        "ours": OurHarness(model, steps, pipelines.mag_ratios),
        "pipeline": pipelines,
    }
    encoded = [(model.encode(prompt), seed) for prompt, seed in chosen]
    _measure(rows, harnesses, encoded[: args.prompts], args.repeats)
    images = {
        row.name: {i: model.pixels(latents) for i, latents in enumerate(row.latents)}
        for row in rows
        if row.error is None
    }
    spec = ModelSpec(str(folder.path), args.device, args.dtype, steps, pipelines.mag_ratios, threads=1)
    _score_rest(rows, chosen[args.prompts :], images, Scorer(model, harnesses), spec, args.quality_workers)
    baselines = {harness: next(row for row in rows if row.name == name) for harness, name in BASELINES.items()}
    results = [_row_results(row, baselines, images, texts, judged) for row in rows]
    identical = all(
        np.array_equal(image, images[BASELINES["pipeline"]][i]) for i, image in images[BASELINES["ours"]].items()
    )
    summary = summarize(results, identical)
    summary["teacache_coefficients"] = None if coefficients is None else list(coefficients)
    summary["teacache_coefficients_source"] = source if coefficients is not None else None
    summary["magcache_ratios"] = pipelines.mag_ratios
    if getattr(args, "out", None):
        title = (
            f"bench cache: {folder.name}, {steps} steps; time: {args.prompts} prompts, median of {args.repeats};"
            f" quality: {len(chosen)} prompts"
        )
        written = plot(
            results, Path(args.out).with_suffix(".png"), title, PSNR_FLOOR_DB, TARGETS["best_speedup_psnr30"]
        )
        summary["plot"] = str(written) if written else None
    defaults = folder.defaults
    config = {
        "family": model.family.name,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "steps": steps,
        "height": defaults.height,
        "width": defaults.width,
        "num_frames": defaults.num_frames,
        "guidance_scale": defaults.guidance_scale,
        "true_cfg_scale": defaults.true_cfg_scale,
        "repeats": args.repeats,
        "timed_prompts": args.prompts,
        "prompt_file": args.prompt_file,
        "fidelity_judged": judged,
        "prompts": [{"prompt": prompt, "seed": seed} for prompt, seed in chosen],
        "calibration_prompts": calibration,
        "blocks": model.runner.executor.num_blocks,
        "versions": {
            "diffusers": diffusers_version,
            "cache_dit": importlib.metadata.version("cache-dit") if importlib.util.find_spec("cache_dit") else None,
        },
        "timing": f"ours: the runner's trajectory creation + all steps; pipeline: {folder.index['_class_name']} call"
        " with prompt embeddings given and output_type='latent'; median over rounds of the mean per output",
    }
    return result_document("cache", str(folder.path), config, results, summary)
