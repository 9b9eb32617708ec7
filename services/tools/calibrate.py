"""Per-model cache constants, fitted on calibration prompts and stored in the model folder's ditserve.json:
TeaCache's rescale polynomial, and the searched step masks of whole-step caching. Any family: the model is
a LocalModel (local_model.py), the roles' own code paths in this process.

TeaCache skips a step while the accumulated change of a cheap indicator (the family's cache_signal: FLUX's
first double block's modulated input, Wan's timestep projection) predicts little change in the
transformer's output. The polynomial turns the indicator's relative L1 change into the output change it
predicts, and only the family's flagship's is published: a model of another depth, width or training
needs its own, or the thresholds mean nothing for it.

Method: run a few prompts uncached through the family's own runner (so exactly what the denoiser serves,
classic CFG included when the model's defaults use it), and at every transformer call record the relative
L1 change, since the previous step of the same CFG branch, of (x) the indicator, computed as
BranchCache.signal computes it at serve time, and (y) the noise prediction. Fit y = f(x) with a 4th-order
polynomial (numpy.polyfit: highest power first, the order of TEACACHE_COEFFICIENTS in policy.py). Prompts
are a fixed, seeded subset of the evaluation prompts of the vocabulary the model was trained on
(calibration_prompts; prompt_file.py), each with its own seed, or a prompt file's.

The result is stored as "teacache_coefficients" in ditserve.json, next to the model's other defaults, with
"teacache_calibration" saying what it was fitted on, including the range of x seen: like TeaCache's own
polynomials, the fit means nothing far outside it.

Step masks (step_masks.py has the search): the objective is the final latents' relative squared error
against the uncached run, its mean plus its worst (or, --objective mean, its mean alone: how the image
model's masks were searched) over the calibration prompts (MASK_SEEDS seeds each, all denoised as one
batch), under whole-step caching (DBCache Fn 0 Bn 0, static mask) with the skipped steps' output
forecast by TaylorSeer of --order (1 by default), or at order 0 the last computed output reused. The
better choice is the model's: on the shipped video model plain reuse keeps far more (searched for the
mean error alone, its best 10-of-30 mask reached 27.4 dB latent SNR with plain reuse, 14.1 dB with
TaylorSeer order 1, whose linear extrapolation across gaps of 4-5 steps overshoots), while the image
model's masks are searched for order 1. They are stored as "step_masks" with
"step_mask_calibration" saying how, the order included: requests should ask for that forecast.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.denoiser.cache.policy import (
    COEFFICIENTS_KEY,
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    mask_bins,
)
from ditserve.services.denoiser.cache.state import relative_l1
from ditserve.services.denoiser.cache.step_masks import (
    MASK_CALIBRATION_KEY,
    STEP_MASKS_KEY,
    Mask,
    SearchedMask,
    mask_text,
    search_masks,
)
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.tools.local_model import LocalModel
from ditserve.services.tools.prompt_file import SHAPES, VOCABULARIES, read_prompts, vocabulary_prompts

CALIBRATION_KEY = "teacache_calibration"
MASK_SEEDS = (10_000, 10_001)  # per calibration prompt; the cache bench's seeds count from 0
CALIBRATION_SEED = 1234  # picks the calibration prompts; the cache bench picks its prompts from the rest
DEFAULT_PROMPTS = 4
DEGREE = 4  # TeaCacheConfig takes the 5 coefficients of a 4th-order polynomial
# What a mask search minimises (MaskObjective), as stored in step_mask_calibration.
MEAN_WORST = "mean+worst"
OBJECTIVES = {
    "mean": "final latents' relative squared error vs uncached, mean over prompts and seeds",
    MEAN_WORST: "final latents' relative squared error vs uncached, mean plus worst over prompts and seeds",
}
# A calibration prompt: a bare prompt (TeaCache: seed = its index; masks: each of MASK_SEEDS), or a prompt
# file's (prompt, seed) pair, run at that seed only.
Prompt = str | tuple[str, int]


def _seeded(prompts: Sequence[Prompt], bare_seeds: Sequence[int] | None) -> list[tuple[str, int]]:
    """(prompt, seed) runs: a pair as given; a bare prompt at each of bare_seeds (None: its index)."""
    runs: list[tuple[str, int]] = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, tuple):
            runs.append(prompt)
        else:
            runs += [(prompt, seed) for seed in (bare_seeds if bare_seeds is not None else [index])]
    return runs


def calibration_prompts(count: int = DEFAULT_PROMPTS, vocabulary: Sequence[str] | None = None) -> list[str]:
    """A fixed, seeded subset of a vocabulary's evaluation prompts (default: the shapes prompts)."""
    prompts = list(vocabulary) if vocabulary is not None else VOCABULARIES[SHAPES]()
    chosen = np.random.default_rng(CALIBRATION_SEED).choice(len(prompts), size=count, replace=False)
    return [prompts[index] for index in sorted(chosen)]


def calibrate_prompts(model_dir: str | Path, prompt_file: str | None, count: int) -> list[Prompt]:
    """What `ditserve calibrate` runs: the prompt file's (prompt, seed) pairs, else `count` prompts of the
    vocabulary the model was trained on, which only such a model may default to (prompt_file.py)."""
    if prompt_file:
        return list(read_prompts(prompt_file))
    return list(calibration_prompts(count, vocabulary_prompts(ModelFolder(model_dir).sidecar, model_dir)))


@dataclass(frozen=True)
class TeaCacheFit:
    coefficients: tuple[float, ...]  # highest power first
    input_changes: tuple[float, ...]  # x: the indicator's relative L1 change, per sample
    output_changes: tuple[float, ...]  # y: the noise prediction's relative L1 change, per sample


def fit_teacache(model: LocalModel, prompts: Sequence[Prompt], steps: int) -> TeaCacheFit:
    """Records (x, y) at every step after a branch's first and fits the polynomial; writes nothing."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    executor = model.runner.executor
    # runner.step calls the transformer for the cond branch, then (CFG) the uncond one: calls alternate.
    branches = 2 if model.uses_cfg else 1
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    xs: list[float] = []
    ys: list[float] = []
    calls = 0

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        nonlocal calls
        branch = calls % branches
        calls += 1
        embedded = executor.embed(**{key: value for key, value in kwargs.items() if key != "return_dict"})
        indicator = executor.cache_signal(embedded.hidden_states, embedded.temb)
        noise = output[0]
        if branch in previous:
            last_indicator, last_noise = previous[branch]
            xs.append(relative_l1(indicator, last_indicator))
            ys.append(relative_l1(noise, last_noise))
        previous[branch] = (indicator, noise)

    handle = model.runner.executor.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        for prompt, seed in _seeded(prompts, None):
            previous.clear()
            model.denoise(model.inputs(model.encode(prompt), seed, steps))
    finally:
        handle.remove()
    if len(set(xs)) <= DEGREE:  # Wan's indicator depends on the timestep alone: one x per step
        raise ValueError(
            f"{len(set(xs))} distinct indicator changes cannot fit a degree-{DEGREE} polynomial:"
            " give more steps or prompts"
        )
    if not all(math.isfinite(value) for value in (*xs, *ys)):
        raise ValueError("a relative change is NaN or Inf: the model's output is not finite")
    coefficients = tuple(float(c) for c in np.polyfit(xs, ys, DEGREE))
    return TeaCacheFit(coefficients, tuple(xs), tuple(ys))


def store_in_sidecar(model_dir: str | Path, entries: dict[str, object]) -> Path:
    """Sets these keys of ditserve.json, keeping every other one; replaced atomically."""
    path = Path(model_dir) / SIDECAR
    sidecar = json.loads(path.read_text()) if path.is_file() else {}
    sidecar.update(entries)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(staged, path)
    return path


def calibrate_teacache(
    model_dir: str | Path,
    prompts: Sequence[Prompt] | None = None,
    steps: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[float, ...]:
    """Fits the model's TeaCache coefficients and stores them in its ditserve.json; returns them.

    prompts: default calibrate_prompts' (the model's vocabulary); steps: default the model's default_steps.
    """
    folder = ModelFolder(model_dir)
    prompts = list(prompts) if prompts is not None else calibrate_prompts(model_dir, None, DEFAULT_PROMPTS)
    steps = steps or folder.defaults.steps
    model = LocalModel.open(folder, device, dtype)
    fit = fit_teacache(model, prompts, steps)
    provenance = {
        "prompts": len(prompts),
        "steps": steps,
        "samples": len(fit.input_changes),
        "input_change_range": [min(fit.input_changes), max(fit.input_changes)],  # where the fit holds
        **model.cfg_scale,
    }
    store_in_sidecar(folder.path, {COEFFICIENTS_KEY: list(fit.coefficients), CALIBRATION_KEY: provenance})
    return fit.coefficients


class MaskObjective:
    """A mask's error: final latents against the uncached run's, relative; the mean over the prompts, plus
    (objective "mean+worst", the default) the worst prompt's, because a mask that serves most prompts can
    still ruin one: on the shipped video model the best 10-of-30 mask for the mean alone skipped steps 1
    and 3-5 and left one clip in 30 at 16 dB PSNR against a mean of 36 dB."""

    def __init__(
        self, model: LocalModel, prompts: Sequence[Prompt], steps: int, order: int, objective: str = MEAN_WORST
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"the mask objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        self.model = model
        self.steps = steps
        self.order = order
        self.worst = objective == MEAN_WORST
        self.requests = [(model.encode(prompt), seed) for prompt, seed in _seeded(prompts, MASK_SEEDS)]
        self.reference = self._denoise(None)
        self.evaluations = 0

    @torch.inference_mode()
    def _denoise(self, mask: Mask | None) -> torch.Tensor:
        cache = CacheConfig()
        if mask is not None:
            compute, cached = mask_bins(mask)
            scm = SCMConfig(compute_bins=compute, cache_bins=cached, policy="static")
            cache = CacheConfig(dbcache=DBCacheConfig.whole_step(scm, self.order))
        trajectories = [
            self.model.runner.start(DenoiseJob("mask", self.model.inputs(prompt, seed, self.steps, cache), self.steps))
            for prompt, seed in self.requests
        ]
        for _ in range(self.steps):  # one batch: every trajectory shares the mask, so the same steps compute
            errors = [error for error in self.model.runner.step(trajectories) if error is not None]
            if errors:
                raise errors[0]
        return torch.stack([trajectory.result().float() for trajectory in trajectories])

    def __call__(self, mask: Mask) -> float:
        self.evaluations += 1
        latents = self._denoise(mask)
        dims = tuple(range(1, latents.dim()))
        error = ((latents - self.reference) ** 2).sum(dims) / (self.reference**2).sum(dims)
        return float(error.mean() + error.max()) if self.worst else float(error.mean())


def fewest_computed_default(steps: int) -> int:
    """A fifth of the steps: past 5x fewer transformer calls no mask keeps an image (on the default model
    the best 6-of-28 mask is at 17.5 dB latent SNR)."""
    return max(2, math.ceil(steps / 5))


def calibrate_step_masks(
    model_dir: str | Path,
    prompts: Sequence[Prompt] | None = None,
    steps: int | None = None,
    fewest: int | None = None,
    order: int = 1,
    objective: str = MEAN_WORST,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[int, SearchedMask]:
    """Searches the model's whole-step masks for one step count and adds them to its ditserve.json.

    Masks for other step counts already stored are kept; this step count's are replaced.
    """
    folder = ModelFolder(model_dir)
    prompts = list(prompts) if prompts is not None else calibrate_prompts(model_dir, None, DEFAULT_PROMPTS)
    steps = steps or folder.defaults.steps
    fewest = fewest or fewest_computed_default(steps)
    if not 2 <= fewest < steps:  # refused before minutes of model work, not after
        raise ValueError(f"--fewest must be in [2, {steps - 1}] for {steps} steps, got {fewest}")
    model = LocalModel.open(folder, device, dtype)
    error = MaskObjective(model, prompts, steps, order, objective)
    with tqdm(total=steps - fewest, desc=f"step masks, {steps} steps", unit="mask") as bar:

        def report(computed: int, found: SearchedMask) -> None:
            bar.set_postfix(computed=computed, snr_db=f"{snr_db(found.error):.1f}")
            bar.update()

        found = search_masks(steps, fewest, error, on_level=report)
    masks = dict(folder.sidecar.get(STEP_MASKS_KEY, {}))
    masks[str(steps)] = {str(count): mask_text(searched.mask) for count, searched in sorted(found.items())}
    provenance = dict(folder.sidecar.get(MASK_CALIBRATION_KEY, {}))
    provenance[str(steps)] = {
        "prompts": len(prompts),
        "seeds": sorted({seed for _, seed in _seeded(prompts, MASK_SEEDS)}),
        "taylorseer_order": order,
        **model.cfg_scale,
        "objective": OBJECTIVES[objective],
        "latent_snr_db": {str(count): round(snr_db(searched.error), 2) for count, searched in sorted(found.items())},
        "evaluations": error.evaluations,
    }
    store_in_sidecar(folder.path, {STEP_MASKS_KEY: masks, MASK_CALIBRATION_KEY: provenance})
    return found


def snr_db(relative_error: float) -> float:
    return math.inf if relative_error <= 0 else -10 * math.log10(relative_error)
