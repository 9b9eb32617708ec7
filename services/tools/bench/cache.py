"""`ditserve bench cache`: our step caching beside its peers, on one model, one prompt set, the same seeds.

Rows (--rows narrows them by name pattern; the two uncached baselines and the control always run):
- ours: our own loop in this process, as the denoiser serves it (FluxRunner, one FluxTrajectory per
  prompt): none; a control, none with the initial noise nudged by CONTROL_NUDGE (no caching, and a change
  far smaller than any cache makes: what the quality measures make of that is their noise floor, and it
  never enters the summary); TeaCache at TEACACHE_THRESHOLDS, and with TaylorSeer (order 1) forecasting the skipped
  residual at TEACACHE_TAYLORSEER_THRESHOLDS; DBCache at Fn 1 and at the deeper Fn cache-dit uses on
  FLUX.1 (4 and 8 of its 57 blocks) scaled to this model's depth, each at DBCACHE_THRESHOLDS, without and
  with TaylorSeer (order 1); the four SCM presets (dynamic, on DBCache Fn 1 with TaylorSeer); whole-step
  caching (DBCache Fn 0 Bn 0: the model's calibrated static mask of WHOLE_STEP_COMPUTED computed steps,
  searched by `ditserve calibrate step-mask` on the calibration prompts, TaylorSeer order 1 forecasting
  the skipped steps' transformer output; rows of a model without such masks report an error).
- cache-dit: each of our DBCache and SCM rows field for field (Fn, Bn, threshold, warmup, caps, TaylorSeer
  order, the very same SCM step mask) through cache_dit.enable_cache on a FluxPipeline, with
  enable_separate_cfg=True under true CFG so each branch keeps its own cache, as cache-dit advises.
- diffusers: FluxPipeline uncached (the peers' baseline) and its transformer's enable_cache hooks:
  FirstBlockCache at FBC_THRESHOLDS; TaylorSeerCache in lite mode (blocks skipped, proj_out forecast,
  factors kept in the model's dtype rather than its bf16 default; computed every N-th step after a
  warmup of 3) at TAYLORSEER_INTERVALS; MagCache at
  MAGCACHE_THRESHOLDS with magnitude ratios from MagCache's own calibrate mode on the calibration prompts.
TeaCache uses the model's calibrated coefficients (ditserve.json "teacache_coefficients", written by
denoiser/cache/calibrate.py); a folder without them gets them fitted here, the same way, not saved. The
bench's prompts (a seeded subset of the shapes evaluation prompts, seed i for prompt i) never include the
calibration prompts. Settings are the model folder's defaults, true CFG with negative prompt "" above 1.

Prompts. One seeded shuffle of the shapes evaluation prompts without the calibration ones, seed i for the
i-th: the quality set is its first --quality-prompts (default: all of them), the timed set its first
--prompts. Two sets because the two measures need different things: a timing needs repeats, which a few
prompts give cheaply, while fidelity moves in whole prompts, and borderline shapes flip under changes far
below what PSNR notices, so a few prompts cannot tell a cache's loss from that luck.

Timing. Rows run interleaved: each round runs every row over the timed set, starting one row later
than the round before; before its prompt set, every row makes one untimed image (so no row pays a first
call after installing its hooks). A row's time per image is the mean over prompts of each prompt's median
over rounds, which a burst of load from elsewhere moves less than a median of round means. Ours times
FluxTrajectory creation (noise, scheduler copy, timesteps) and every step. A pipeline row times one
FluxPipeline call given the same prompt embeddings (so no text encoding) with output_type="latent" (so no
VAE decode): noise, timesteps and the loop. Installing and removing a peer's hooks happens between prompt
sets, untimed. Speedup is against the uncached row of the same harness; both baselines are reported and
should agree. Each harness has its own copy of the transformer, and cache-dit a third: its disable_cache
keeps the forward it patched into the transformer.

Quality, over the quality set: the timed prompts' first-round images, then one untimed pass of every
row over the other prompts. Images are decoded by one VAE as the VAE service decodes: PSNR and SSIM
(Gaussian 11x11 window, sigma 1.5, per RGB channel) against the uncached image of the same prompt and seed
in the same harness, and prompt fidelity (eval/fidelity.py: all attributes right, in points, with the
prompts it loses and gains against that uncached image). A row's
PSNR is the mean of its per-image PSNRs, each capped at PSNR_CAP_DB (identical images). Skipped block
evaluations: ours from RequestCache; a pipeline row counts block bodies that ran, through forward hooks on
each block's first norm layer (diffusers' hooks replace a block's forward, so a hook on the block itself
would also count the calls they skip), against steps x CFG branches x blocks.

Summary: ours and the peers each get the highest speedup among cached rows with mean PSNR >= 30 dB and
fidelity at most 2 points below uncached; ratio_vs_peer divides the two. A row that fails keeps its error
and stays out of the summary. A speedup-vs-PSNR scatter plot is written next to the JSON as <out>.png.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import fnmatch
import importlib.metadata
import importlib.util
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ditserve.client.config import default_model_dir
from ditserve.services.common.device import add_arguments as add_device_arguments
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import (
    CALIBRATED,
    SCM_PRESETS,
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from ditserve.services.denoiser.cache.step_masks import resolve, stored_masks
from ditserve.services.tools.bench.common import median, result_document
from ditserve.services.tools.eval.fidelity import score_image
from ditserve.services.tools.training.shapes import all_combinations

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline

    from ditserve.services.families.flux.runner import Conditioning
    from ditserve.services.tools.calibrate import LocalFlux

FLUX1_BLOCKS = 57  # 19 double + 38 single: the depth cache-dit's Fn settings are quoted for
CACHE_DIT_FLUX1_FN = (4, 8)
# TeaCache4FLUX's published FLUX.1 settings (0.25-0.8), and below them, where a calibrated small model keeps 30 dB.
TEACACHE_THRESHOLDS = (0.06, 0.08, 0.1, 0.12, 0.15, 0.25, 0.4, 0.6, 0.8)
# TaylorSeer forecasts what TeaCache skips, so it is tried where plain reuse falls under 30 dB.
TEACACHE_TAYLORSEER_THRESHOLDS = (0.1, 0.12, 0.15, 0.25)
DBCACHE_THRESHOLDS = (0.08, 0.16, 0.24)
# SCM rows: the mask's cached steps still pass the DBCache rule (policy dynamic), with no cap of their own.
SCM_BASE = DBCacheConfig(fn=1, max_continuous_cached_steps=-1, taylorseer=TaylorSeerConfig(order=1))
FBC_THRESHOLDS = (0.05, 0.08, 0.12, 0.2)
TAYLORSEER_INTERVALS = (2, 3, 4, 5)
# Whole-step rows: computed steps out of the schedule, on the model's calibrated masks.
WHOLE_STEP_COMPUTED = (7, 8, 9, 10, 11, 12)
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24)
# The control row: uncached, its initial noise nudged by this much noise (std): no cache, a tiny change.
CONTROL_NUDGE = 0.01
UNCACHED = ("none", "control")  # never in the summary
PSNR_FLOOR_DB = 30.0
FIDELITY_SLACK = 2.0  # points of fidelity a cached row may lose against uncached
PSNR_CAP_DB = 100.0
BASELINE_TOLERANCE = 0.1  # the two uncached baselines may differ by this much before timings are flagged
TARGETS = {"best_speedup_psnr30": 2.0, "ratio_vs_peer": 1.1}
PROMPT_SEED = 0
HARNESS = {"ours": "ours", "cache-dit": "pipeline", "diffusers": "pipeline"}
BASELINES = {"ours": "ours/none", "pipeline": "diffusers/none"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device_arguments(parser)
    parser.add_argument("--model", default=str(default_model_dir()), help="model folder (default: the shipped model)")
    parser.add_argument("--prompts", type=int, default=10, help="timed prompts, a round each (default: 10)")
    parser.add_argument(
        "--quality-prompts",
        type=int,
        help="prompts whose images are scored, the timed ones first (default: every evaluation prompt not used"
        " for calibration)",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's default_steps)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default: 3)")
    parser.add_argument(
        "--rows",
        help="comma-separated name patterns (fnmatch) of the rows to run, e.g. 'ours/teacache*,diffusers/*';"
        " default: all",
    )


@dataclass
class Row:
    """One configuration and what it measured; `cache` serves ours and cache-dit, `hook` diffusers."""

    name: str
    peer: str  # "ours", "cache-dit" or "diffusers"
    method: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    hook: dict[str, float] = field(default_factory=dict)
    seconds: list[list[float]] = field(default_factory=list)  # per prompt, per round
    latents: list[Any] = field(default_factory=list)  # first round, per prompt
    skipped: list[float] = field(default_factory=list)  # first round, per prompt
    deterministic: bool = True  # every round's latents equal the first round's
    error: str | None = None

    @property
    def harness(self) -> str:
        return HARNESS[self.peer]

    @property
    def params(self) -> dict[str, Any]:
        if self.peer == "diffusers":
            return dict(self.hook)
        config = self.cache.teacache or self.cache.dbcache
        return {} if config is None else dataclasses.asdict(config)


def depth_scaled_fn(num_blocks: int) -> list[int]:
    """Fn 1, and cache-dit's deeper FLUX.1 settings at this model's depth, each leaving a middle block."""
    if num_blocks <= 2:
        return [1]
    deeper = {min(num_blocks - 1, max(2, round(fn * num_blocks / FLUX1_BLOCKS))) for fn in CACHE_DIT_FLUX1_FN}
    return sorted({1} | deeper)


def all_rows(num_blocks: int) -> list[Row]:
    rows = [Row("ours/none", "ours", "none"), Row("diffusers/none", "diffusers", "none")]
    rows.append(Row(f"ours/none nudged {CONTROL_NUDGE:g}", "ours", "control"))
    for threshold in TEACACHE_THRESHOLDS:
        rows.append(Row(f"ours/teacache t={threshold}", "ours", "teacache", CacheConfig(TeaCacheConfig(threshold))))
    for threshold in TEACACHE_TAYLORSEER_THRESHOLDS:
        config = TeaCacheConfig(threshold, taylorseer=TaylorSeerConfig(order=1, parent="teacache"))
        name = f"ours/teacache t={threshold} +taylorseer"
        rows.append(Row(name, "ours", "teacache+taylorseer", CacheConfig(config)))
    dbcache: list[tuple[str, str, DBCacheConfig]] = []
    for fn in depth_scaled_fn(num_blocks):
        for threshold in DBCACHE_THRESHOLDS:
            for taylorseer in (None, TaylorSeerConfig(order=1)):
                method = "dbcache+taylorseer" if taylorseer else "dbcache"
                suffix = " +taylorseer" if taylorseer else ""
                config = DBCacheConfig(fn=fn, residual_diff_threshold=threshold, taylorseer=taylorseer)
                dbcache.append((f"dbcache F{fn}B0 r={threshold}{suffix}", method, config))
    for preset in SCM_PRESETS:
        config = dataclasses.replace(SCM_BASE, scm=SCMConfig(preset=preset))
        dbcache.append((f"scm {preset}", "scm", config))
    for peer in ("ours", "cache-dit"):
        rows += [Row(f"{peer}/{name}", peer, method, CacheConfig(dbcache=c)) for name, method, c in dbcache]
    for k in WHOLE_STEP_COMPUTED:
        name = f"ours/whole-step calibrated k={k} +taylorseer"
        scm = SCMConfig(preset=CALIBRATED, computed_steps=k, policy="static")
        rows.append(Row(name, "ours", "whole-step", CacheConfig(dbcache=DBCacheConfig.whole_step(scm))))
    rows += [Row(f"diffusers/fbc t={t}", "diffusers", "fbc", hook={"threshold": t}) for t in FBC_THRESHOLDS]
    rows += [
        Row(f"diffusers/taylorseer-lite i={i}", "diffusers", "taylorseer-lite", hook={"cache_interval": i})
        for i in TAYLORSEER_INTERVALS
    ]
    rows += [
        Row(f"diffusers/magcache t={t}", "diffusers", "magcache", hook={"threshold": t}) for t in MAGCACHE_THRESHOLDS
    ]
    return rows


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    if not patterns:
        return rows
    wanted = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    chosen = [
        row
        for row in rows
        if row.name in BASELINES.values()
        or row.method == "control"
        or any(fnmatch.fnmatchcase(row.name, p) for p in wanted)
    ]
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(row.name, p) for row in rows)]
    if unmatched:
        raise SystemExit(f"--rows: no row matches {unmatched} (rows are named like 'ours/teacache t=0.4')")
    return chosen


def bench_prompts(count: int | None, excluded: Sequence[str]) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: the first `count` (None: all) of a seeded shuffle of the evaluation prompts
    without the calibration ones, so a shorter list is the start of a longer one."""
    prompts = [spec.prompt for spec in all_combinations() if spec.prompt not in excluded]
    if count is not None and not 1 <= count <= len(prompts):
        raise SystemExit(f"there are {len(prompts)} bench prompts, asked for {count}")
    order = np.random.default_rng(PROMPT_SEED).permutation(len(prompts))[:count]
    return [(prompts[index], seed) for seed, index in enumerate(order)]


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255**2 / mse))


def _gaussian_blur_valid(values: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filter over the first two axes, keeping only full windows ('valid')."""
    size = len(taps)
    rows = sum(weight * values[k : values.shape[0] - size + 1 + k] for k, weight in enumerate(taps))
    return sum(weight * rows[:, k : rows.shape[1] - size + 1 + k] for k, weight in enumerate(taps))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, range 255; the mean
    of the SSIM map over the window positions inside the image, per channel, then over channels."""
    if min(image.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {image.shape[:2]}")
    offsets = np.arange(11) - 5
    taps = np.exp(-(offsets**2) / (2 * 1.5**2))
    taps /= taps.sum()
    x, y = image.astype(np.float64), reference.astype(np.float64)
    mu_x, mu_y = _gaussian_blur_valid(x, taps), _gaussian_blur_valid(y, taps)
    var_x = _gaussian_blur_valid(x * x, taps) - mu_x**2
    var_y = _gaussian_blur_valid(y * y, taps) - mu_y**2
    covariance = _gaussian_blur_valid(x * y, taps) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OurHarness:
    """Our rows: the denoiser's own loop, in this process."""

    def __init__(self, model: LocalFlux, steps: int) -> None:
        self.model = model
        self.steps = steps

    def install(self, row: Row) -> None:
        """Nothing to install: the cache policy travels with each request."""

    def uninstall(self, row: Row) -> None:
        """Nothing to remove."""

    def run(self, row: Row, prompt: Conditioning, seed: int) -> tuple[float, Any, float]:
        inputs = self.model.inputs(prompt, seed, self.steps, row.cache)
        started = time.perf_counter()
        trajectory = self.model.denoise(inputs, nudge=CONTROL_NUDGE if row.method == "control" else 0.0)
        _synchronize(self.model.device)
        return time.perf_counter() - started, trajectory.result(), trajectory.cache.skipped_fraction


class BlockCounter:
    """Counts transformer-block bodies run, via each block's first norm layer (see the module docstring)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.count = 0
        norms = [block.norm1 for block in transformer.transformer_blocks]
        norms += [block.norm for block in transformer.single_transformer_blocks]
        self.blocks = len(norms)
        for norm in norms:
            norm.register_forward_hook(self._hit)

    def _hit(self, *_: object) -> None:
        self.count += 1


class PipelineHarness:
    """The peers' rows: FluxPipeline, one per peer library, each with its own copy of the transformer."""

    def __init__(self, model: LocalFlux, steps: int, vae: torch.nn.Module) -> None:
        self.model = model
        self.steps = steps
        self.vae = vae
        self.pipes: dict[str, tuple[FluxPipeline, BlockCounter]] = {}
        self.mag_ratios: list[float] | None = None

    def pipe(self, peer: str) -> tuple[FluxPipeline, BlockCounter]:
        if peer not in self.pipes:
            from diffusers import FluxPipeline

            folder, device, dtype = self.model.folder, self.model.device, self.model.runner.dtype
            transformer = folder.load("transformer", device, dtype)
            pipe = FluxPipeline(
                scheduler=folder.load("scheduler"),
                vae=self.vae,
                text_encoder=None,
                tokenizer=None,
                text_encoder_2=None,
                tokenizer_2=None,
                transformer=transformer,
            )
            pipe.set_progress_bar_config(disable=True)
            self.pipes[peer] = (pipe, BlockCounter(transformer))
        return self.pipes[peer]

    def install(self, row: Row) -> None:
        pipe, _ = self.pipe(row.peer)
        if row.peer == "cache-dit":
            import cache_dit

            config = row.cache.dbcache
            assert config is not None
            mask = config.scm.mask(self.steps) if config.scm is not None else None
            cache_dit.enable_cache(
                pipe,
                cache_config=cache_dit.DBCacheConfig(
                    Fn_compute_blocks=config.fn,
                    Bn_compute_blocks=config.bn,
                    residual_diff_threshold=config.residual_diff_threshold,
                    max_warmup_steps=config.max_warmup_steps,
                    warmup_interval=config.warmup_interval,
                    max_cached_steps=config.max_cached_steps,
                    max_continuous_cached_steps=config.max_continuous_cached_steps,
                    enable_separate_cfg=True if self.model.true_cfg else None,
                    num_inference_steps=self.steps,
                    steps_computation_mask=None if mask is None else [int(compute) for compute in mask],
                    steps_computation_policy=config.scm.policy if config.scm is not None else "dynamic",
                ),
                calibrator_config=(
                    None
                    if config.taylorseer is None
                    else cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer.order)
                ),
            )
        elif row.method != "none":
            pipe.transformer.enable_cache(self._diffusers_config(row))

    def _diffusers_config(self, row: Row) -> object:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        if row.method == "fbc":
            return FirstBlockCacheConfig(threshold=row.hook["threshold"])
        if row.method == "taylorseer-lite":
            return TaylorSeerCacheConfig(
                cache_interval=int(row.hook["cache_interval"]),
                use_lite_mode=True,
                taylor_factors_dtype=self.model.runner.dtype,
            )
        return MagCacheConfig(
            threshold=row.hook["threshold"], num_inference_steps=self.steps, mag_ratios=self.mag_ratios
        )

    def uninstall(self, row: Row) -> None:
        pipe, _ = self.pipe(row.peer)
        if row.peer == "cache-dit":
            import cache_dit

            cache_dit.disable_cache(pipe)
        elif row.method != "none":
            pipe.transformer.disable_cache()

    def run(self, row: Row, prompt: Conditioning, seed: int) -> tuple[float, Any, float]:
        import torch

        pipe, counter = self.pipe(row.peer)
        defaults, negative = self.model.defaults, self.model.negative
        counter.count = 0
        started = time.perf_counter()
        latents = pipe(
            prompt_embeds=prompt.embeds,
            pooled_prompt_embeds=prompt.pooled,
            negative_prompt_embeds=None if negative is None else negative.embeds,
            negative_pooled_prompt_embeds=None if negative is None else negative.pooled,
            true_cfg_scale=defaults.true_cfg_scale,
            height=defaults.height,
            width=defaults.width,
            num_inference_steps=self.steps,
            guidance_scale=defaults.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
        _synchronize(self.model.device)
        seconds = time.perf_counter() - started
        uncached = self.steps * (2 if negative is not None else 1) * counter.blocks
        return seconds, latents, 1.0 - counter.count / uncached

    def calibrate_magcache(self, prompts: Sequence[Conditioning]) -> list[float]:
        """MagCache's own calibrate mode, which prints one ratio list per run and CFG branch; their mean."""
        from diffusers import MagCacheConfig

        pipe, _ = self.pipe("diffusers")
        printed = io.StringIO()
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
        try:
            with contextlib.redirect_stdout(printed):
                for seed, prompt in enumerate(prompts):
                    self.run(Row("calibration", "diffusers", "magcache"), prompt, seed)
        finally:
            pipe.transformer.disable_cache()
        runs = [
            ast.literal_eval(line)
            for line in printed.getvalue().splitlines()
            if line.startswith("[") and not line.startswith("[MagCache]")
        ]
        if not runs:
            raise RuntimeError("MagCache's calibrate mode printed no ratios")
        self.mag_ratios = [float(r) for r in np.mean(runs, axis=0)]
        return self.mag_ratios


class Decoder:
    """Latents to uint8 pixels exactly as the VAE service decodes them."""

    def __init__(self, vae: torch.nn.Module, model: LocalFlux) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.vae = vae
        self.scale = model.runner.vae_scale
        self.processor = VaeImageProcessor(vae_scale_factor=self.scale * 2)
        self.defaults = model.defaults

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        from ditserve.services.families.flux import latents as flux

        with torch.inference_mode():
            unpacked = flux.unpack_latents(latents, self.defaults.height, self.defaults.width, self.scale)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(unpacked.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            pixels = self.processor.postprocess(decoded, output_type="np")
        return (pixels[0] * 255).round().astype(np.uint8)


def _installed_runs(
    row: Row, harness: OurHarness | PipelineHarness, prompts: Sequence[tuple[Conditioning, int]], warm_up: bool
) -> list[tuple[float, Any, float]]:
    """The row's (seconds, latents, skipped) per prompt, its hooks installed for them and removed after."""
    harness.install(row)
    try:
        if warm_up:
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
    prompts: Sequence[tuple[Conditioning, int]],
    first: bool,
) -> None:
    import torch

    results = _installed_runs(row, harness, prompts, warm_up=True)
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
    prompts: Sequence[tuple[Conditioning, int]],
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
    rows: list[Row], harnesses: dict[str, OurHarness | PipelineHarness], prompts: Sequence[tuple[Conditioning, int]]
) -> None:
    """One untimed pass of every row over the quality prompts past the timed ones."""
    for row in tqdm([row for row in rows if row.error is None], desc="quality prompts", unit="row"):
        try:
            results = _installed_runs(row, harnesses[row.harness], prompts, warm_up=False)
        except Exception as error:
            _fail(row, error)
            continue
        row.latents += [latents for _, latents, _ in results]
        row.skipped += [skipped for _, _, skipped in results]
    _check_baselines(rows)


def _denoise_seconds(row: Row) -> float:
    """Per image: the mean over prompts of each prompt's median over rounds."""
    return float(np.mean([median(samples) for samples in row.seconds]))


def _row_results(
    row: Row, baselines: dict[str, Row], images: dict[str, list[np.ndarray]], prompts: list[str]
) -> dict[str, Any]:
    result: dict[str, Any] = {"name": row.name, "peer": row.peer, "method": row.method, "params": row.params}
    if row.error is not None:
        return {**result, "error": row.error}
    baseline = baselines[row.harness]
    own, reference = images[row.name], images[baseline.name]
    reference_row = row is baseline
    psnrs = [psnr(image, ref) for image, ref in zip(own, reference, strict=True)]
    denoise_s = _denoise_seconds(row)
    passed = _passes(own, prompts)
    passed_uncached = _passes(reference, prompts)
    return {
        **result,
        "denoise_s": denoise_s,
        "denoise_s_rounds": [float(np.mean(round_)) for round_ in zip(*row.seconds, strict=True)],
        "speedup": _denoise_seconds(baseline) / denoise_s,
        "skipped_fraction": float(np.mean(row.skipped)),
        "psnr_db": None if reference_row else float(np.mean(psnrs)),
        "psnr_min_db": None if reference_row else min(psnrs),
        "ssim": None if reference_row else float(np.mean([ssim(i, r) for i, r in zip(own, reference, strict=True)])),
        "fidelity": 100 * float(np.mean(passed)),
        "fidelity_lost": sum(was and not now for was, now in zip(passed_uncached, passed, strict=True)),
        "fidelity_gained": sum(now and not was for was, now in zip(passed_uncached, passed, strict=True)),
        "deterministic": row.deterministic,
    }


def _passes(images: list[np.ndarray], prompts: list[str]) -> list[bool]:
    """Per image: does it show every attribute its prompt asks for (eval/fidelity.py)?"""
    return [score_image(Image.fromarray(image), prompt)["all"] for image, prompt in zip(images, prompts, strict=True)]


def _best(results: list[dict[str, Any]], peers: set[str], fidelity_none: float) -> dict[str, Any] | None:
    """The fastest cached row of these peers that keeps mean PSNR >= 30 dB and fidelity within the slack."""
    eligible = [
        r
        for r in results
        if r["peer"] in peers
        and r["method"] not in UNCACHED
        and "error" not in r
        and r["psnr_db"] >= PSNR_FLOOR_DB
        and r["fidelity"] >= fidelity_none - FIDELITY_SLACK
    ]
    return max(eligible, key=lambda r: r["speedup"], default=None)


def summarize(results: list[dict[str, Any]], baseline_identical: bool) -> dict[str, Any]:
    by_name = {r["name"]: r for r in results}
    ours_none, pipe_none = by_name[BASELINES["ours"]], by_name[BASELINES["pipeline"]]
    fidelity_none = ours_none["fidelity"]
    ours = _best(results, {"ours"}, fidelity_none)
    peer = _best(results, {"cache-dit", "diffusers"}, pipe_none["fidelity"])
    best = ours["speedup"] if ours else None
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
        "targets": TARGETS,
        "targets_met": {
            "best_speedup_psnr30": best is not None and best >= TARGETS["best_speedup_psnr30"],
            "ratio_vs_peer": ratio is not None and ratio >= TARGETS["ratio_vs_peer"],
        },
        "rule": f"cached, mean PSNR >= {PSNR_FLOOR_DB} dB, fidelity >= uncached - {FIDELITY_SLACK}",
        "fidelity_none": fidelity_none,
        "baseline_denoise_s": {"ours": ours_none["denoise_s"], "pipeline": pipe_none["denoise_s"]},
        "baseline_ratio_ours_vs_pipeline": baseline_ratio,
        "timing_warning": timing_warning,
        "baselines_identical": baseline_identical,
        "errors": {r["name"]: r["error"] for r in results if "error" in r},
        "nondeterministic": [r["name"] for r in results if r.get("deterministic") is False],
    }
    return summary


# Plot: one colour per peer and method, one marker shape per peer.
SERIES_COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (255, 187, 120),
]


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [t * step for t in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _marker(draw: ImageDraw.ImageDraw, peer: str, x: float, y: float, color: tuple[int, int, int]) -> None:
    r = 5
    if peer == "ours":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(0, 0, 0))
    elif peer == "cache-dit":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color, outline=(0, 0, 0))
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=color, outline=(0, 0, 0))


def plot(results: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Speedup against PSNR for the cached rows that ran, with the 30 dB and 2x lines of the summary rule."""
    points = [r for r in results if "error" not in r and r.get("psnr_db") is not None]
    if not points:
        return None
    width, height, left, right, top, bottom = 960, 640, 80, 300, 50, 70
    x_low = min(PSNR_FLOOR_DB - 5, min(r["psnr_db"] for r in points)) - 1
    x_high = max(PSNR_FLOOR_DB + 5, max(r["psnr_db"] for r in points)) + 1
    y_high = max(TARGETS["best_speedup_psnr30"], max(r["speedup"] for r in points)) * 1.1
    y_low = min(0.9, min(r["speedup"] for r in points) * 0.95)

    def at(psnr_db: float, speedup: float) -> tuple[float, float]:
        x = left + (psnr_db - x_low) / (x_high - x_low) * (width - left - right)
        y = height - bottom - (speedup - y_low) / (y_high - y_low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    plot_right, plot_bottom = width - right, height - bottom
    for value in _ticks(x_low, x_high):
        x, _ = at(value, y_low)
        draw.line((x, top, x, plot_bottom), fill=(235, 235, 235))
        draw.text((x, plot_bottom + 6), f"{value:g}", fill="black", font=font, anchor="mt")
    for value in _ticks(y_low, y_high):
        _, y = at(x_low, value)
        draw.line((left, y, plot_right, y), fill=(235, 235, 235))
        draw.text((left - 6, y), f"{value:g}", fill="black", font=font, anchor="rm")
    x30, y2 = at(PSNR_FLOOR_DB, TARGETS["best_speedup_psnr30"])
    draw.line((x30, top, x30, plot_bottom), fill=(200, 60, 60), width=1)
    draw.line((left, y2, plot_right, y2), fill=(200, 60, 60), width=1)
    draw.rectangle((left, top, plot_right, plot_bottom), outline="black")
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mm")
    draw.text(((left + plot_right) / 2, height - 25), "PSNR vs uncached (dB)", fill="black", font=font, anchor="mm")
    draw.text((15, top - 12), "speedup vs uncached (same harness)", fill="black", font=font, anchor="lm")
    series = sorted({(r["peer"], r["method"]) for r in points}, key=lambda s: (s[0] != "ours", s))
    colors = {key: SERIES_COLORS[index % len(SERIES_COLORS)] for index, key in enumerate(series)}
    for r in points:
        _marker(draw, r["peer"], *at(r["psnr_db"], r["speedup"]), colors[(r["peer"], r["method"])])
    for index, key in enumerate(series):
        y = top + 10 + index * 22
        _marker(draw, key[0], plot_right + 25, y, colors[key])
        draw.text((plot_right + 40, y), f"{key[0]} {key[1]}", fill="black", font=font, anchor="lm")
    image.save(path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import __version__ as diffusers_version

    from ditserve.services.common.device import resolve_device, resolve_dtype
    from ditserve.services.common.model import ModelFolder
    from ditserve.services.tools.calibrate import (
        COEFFICIENTS_KEY,
        LocalFlux,
        calibration_prompts,
        fit_teacache,
    )

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # else it logs its whole config on every enable
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = ModelFolder(args.model)
    model = LocalFlux(folder, device, dtype)
    steps = args.steps or folder.defaults.steps
    rows = select_rows(all_rows(model.runner.executor.num_blocks), args.rows)
    cache_dit_installed = importlib.util.find_spec("cache_dit") is not None
    for row in rows:
        if row.peer == "cache-dit" and not cache_dit_installed:
            row.error = "cache-dit is not installed: pip install 'ditserve[bench]'"

    calibration = calibration_prompts()
    coefficients = folder.sidecar.get(COEFFICIENTS_KEY)
    source = f"{folder.path.name}/ditserve.json"
    if coefficients is None and any(row.method == "teacache" for row in rows):
        coefficients, source = fit_teacache(model, calibration, steps).coefficients, "fitted in the bench"
    masks = stored_masks(folder.sidecar)
    for row in rows:
        if row.cache.teacache is not None:
            row.cache = CacheConfig(dataclasses.replace(row.cache.teacache, coefficients=tuple(coefficients)))
        try:
            row.cache = resolve(row.cache, steps, masks)
        except InvalidArgument as error:
            row.error = f"{error.field}: {error.reason}"

    vae = folder.load("vae", device, dtype)
    pipelines = PipelineHarness(model, steps, vae)
    harnesses: dict[str, OurHarness | PipelineHarness] = {
        "ours": OurHarness(model, steps),
        "pipeline": pipelines,
    }
    if any(row.method == "magcache" and row.error is None for row in rows):
        pipelines.calibrate_magcache([model.encode(prompt) for prompt in calibration])

    chosen = bench_prompts(args.quality_prompts, calibration)
    if args.prompts > len(chosen):
        raise SystemExit(f"--prompts {args.prompts} is more than the {len(chosen)} quality prompts")
    texts = [prompt for prompt, _ in chosen]
    encoded = [(model.encode(prompt), seed) for prompt, seed in chosen]
    _measure(rows, harnesses, encoded[: args.prompts], args.repeats)
    _score_rest(rows, harnesses, encoded[args.prompts :])

    decode = Decoder(vae, model)
    images = {row.name: [decode(latents) for latents in row.latents] for row in rows if row.error is None}
    baselines = {harness: next(row for row in rows if row.name == name) for harness, name in BASELINES.items()}
    results = [_row_results(row, baselines, images, texts) for row in rows]
    identical = all(
        np.array_equal(a, b) for a, b in zip(images[BASELINES["ours"]], images[BASELINES["pipeline"]], strict=True)
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
        written = plot(results, Path(args.out).with_suffix(".png"), title)
        summary["plot"] = str(written) if written else None
    config = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "height": folder.defaults.height,
        "width": folder.defaults.width,
        "guidance_scale": folder.defaults.guidance_scale,
        "true_cfg_scale": folder.defaults.true_cfg_scale,
        "repeats": args.repeats,
        "timed_prompts": args.prompts,
        "prompts": [{"prompt": prompt, "seed": seed} for prompt, seed in chosen],
        "calibration_prompts": calibration,
        "blocks": model.runner.executor.num_blocks,
        "versions": {
            "diffusers": diffusers_version,
            "cache_dit": importlib.metadata.version("cache-dit") if cache_dit_installed else None,
        },
        "timing": "ours: FluxTrajectory creation + all steps; pipeline: FluxPipeline call with prompt"
        " embeddings given and output_type='latent'; median over rounds of the mean per image",
    }
    return result_document("cache", str(folder.path), config, results, summary)
