"""Fits TeaCache's rescale polynomial for one model folder and stores it in the folder's ditserve.json.

TeaCache skips a step while the accumulated change of a cheap indicator (the first double block's
modulated input) predicts little change in the transformer's output. The polynomial turns the indicator's
relative L1 change into the output change it predicts, and only FLUX.1's is published: a model of another
depth, width or training needs its own, or the thresholds mean nothing for it.

Method: run a few prompts uncached through our own runner (so exactly what the denoiser serves, true CFG
included when the model's defaults use it), and at every transformer call record the relative L1 change,
since the previous step of the same CFG branch, of (x) the indicator, computed as BranchCache.signal
computes it at serve time, and (y) the noise prediction. Fit y = f(x) with a 4th-order polynomial
(numpy.polyfit: highest power first, the order of TEACACHE_COEFFICIENTS in policy.py). Prompts are a
fixed, seeded subset of the shapes evaluation prompts (calibration_prompts), each with its own seed.

The result is stored as "teacache_coefficients" in ditserve.json, next to the model's other defaults, with
"teacache_calibration" saying what it was fitted on, including the range of x seen: like TeaCache's own
polynomials, the fit means nothing far outside it. LocalFlux, the in-process encoder + runner used here,
is also what `ditserve bench cache` runs our rows with.
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
from diffusers import FluxPipeline

from ditserve.services.common import flux
from ditserve.services.common.device import resolve_device, resolve_dtype
from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.denoiser.cache.flux_blocks import relative_l1
from ditserve.services.denoiser.cache.policy import COEFFICIENTS_KEY, CacheConfig, model_teacache_coefficients
from ditserve.services.denoiser.flux_runner import Conditioning, FluxInputs, FluxRunner, FluxTrajectory
from ditserve.services.training.shapes import all_combinations

CALIBRATION_KEY = "teacache_calibration"
CALIBRATION_SEED = 1234  # picks the calibration prompts; the cache bench picks its prompts from the rest
DEFAULT_PROMPTS = 4
DEGREE = 4  # TeaCacheConfig takes the 5 coefficients of a 4th-order polynomial


def calibration_prompts(count: int = DEFAULT_PROMPTS) -> list[str]:
    """A fixed, seeded subset of the shapes evaluation prompts."""
    prompts = [spec.prompt for spec in all_combinations()]
    chosen = np.random.default_rng(CALIBRATION_SEED).choice(len(prompts), size=count, replace=False)
    return [prompts[index] for index in sorted(chosen)]


class LocalFlux:
    """The encoder's prompt encoding and the denoiser's FluxRunner in one process, from one model folder.

    Requests take the folder's defaults (size, guidance, true CFG with negative prompt "" above 1), as a
    served request that sets none of them would.
    """

    def __init__(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> None:
        self.folder = folder
        self.defaults = folder.defaults
        self.device = device
        # A text-only FluxPipeline gives FluxPipeline's own prompt encoding, as in the encoder service.
        self.text = FluxPipeline(
            scheduler=None,
            vae=None,
            transformer=None,
            tokenizer=folder.load("tokenizer"),
            tokenizer_2=folder.load("tokenizer_2"),
            text_encoder=folder.load("text_encoder", device, dtype),
            text_encoder_2=folder.load("text_encoder_2", device, dtype),
        )
        self.max_sequence_length = min(self.defaults.max_sequence_length, self.text.tokenizer_2.model_max_length)
        self.runner = FluxRunner(
            folder.load("transformer", device, dtype),
            folder.load("scheduler"),
            flux.vae_scale_factor(folder.config("vae")),
            device,
            dtype,
            teacache_coefficients=model_teacache_coefficients(folder.family, folder.sidecar),
        )
        self.true_cfg = self.defaults.true_cfg_scale > 1
        self.negative = self.encode("") if self.true_cfg else None

    @torch.inference_mode()
    def encode(self, prompt: str) -> Conditioning:
        embeds, pooled, _ = self.text.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning(embeds, pooled)

    def inputs(self, prompt: Conditioning, seed: int, steps: int, cache: CacheConfig | None = None) -> FluxInputs:
        defaults = self.defaults
        return FluxInputs(
            prompt=prompt,
            negative=self.negative,
            height=defaults.height,
            width=defaults.width,
            steps=steps,
            guidance_scale=defaults.guidance_scale,
            true_cfg_scale=defaults.true_cfg_scale,
            seed=seed,
            num_images=1,
            cache=cache or CacheConfig(),
        )

    def denoise(self, inputs: FluxInputs) -> FluxTrajectory:
        """All steps of one request; the trajectory holds the latents and its cache's statistics."""
        trajectory = FluxTrajectory(self.runner, inputs)
        for _ in range(inputs.steps):
            (error,) = self.runner.step([trajectory])
            if error is not None:
                raise error
        return trajectory


@dataclass(frozen=True)
class TeaCacheFit:
    coefficients: tuple[float, ...]  # highest power first
    input_changes: tuple[float, ...]  # x: the indicator's relative L1 change, per sample
    output_changes: tuple[float, ...]  # y: the noise prediction's relative L1 change, per sample


def fit_teacache(model: LocalFlux, prompts: Sequence[str], steps: int) -> TeaCacheFit:
    """Records (x, y) at every step after a branch's first and fits the polynomial; writes nothing."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    executor = model.runner.executor
    # runner.step calls the transformer for the cond branch, then (true CFG) the uncond one: calls alternate.
    branches = 2 if model.true_cfg else 1
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    xs: list[float] = []
    ys: list[float] = []
    calls = 0

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        nonlocal calls
        branch = calls % branches
        calls += 1
        embedded = executor.embed(**{key: value for key, value in kwargs.items() if key != "return_dict"})
        indicator = executor.modulated_input(embedded.hidden_states, embedded.temb)
        noise = output[0]
        if branch in previous:
            last_indicator, last_noise = previous[branch]
            xs.append(relative_l1(indicator, last_indicator))
            ys.append(relative_l1(noise, last_noise))
        previous[branch] = (indicator, noise)

    handle = model.runner.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        for seed, prompt in enumerate(prompts):
            previous.clear()
            model.denoise(model.inputs(model.encode(prompt), seed, steps))
    finally:
        handle.remove()
    if len(xs) <= DEGREE:
        raise ValueError(f"{len(xs)} samples cannot fit a degree-{DEGREE} polynomial: give more prompts or steps")
    if not all(math.isfinite(value) for value in (*xs, *ys)):
        raise ValueError("a relative change is NaN or Inf: the model's output is not finite")
    coefficients = tuple(float(c) for c in np.polyfit(xs, ys, DEGREE))
    return TeaCacheFit(coefficients, tuple(xs), tuple(ys))


def store_teacache_coefficients(model_dir: str | Path, coefficients: Sequence[float], **provenance: object) -> Path:
    """Adds the coefficients to ditserve.json, keeping every other key; replaced atomically."""
    path = Path(model_dir) / SIDECAR
    sidecar = json.loads(path.read_text()) if path.is_file() else {}
    sidecar[COEFFICIENTS_KEY] = [float(c) for c in coefficients]
    sidecar[CALIBRATION_KEY] = provenance
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(staged, path)
    return path


def calibrate_teacache(
    model_dir: str | Path,
    prompts: Sequence[str] | None = None,
    steps: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[float, ...]:
    """Fits the model's TeaCache coefficients and stores them in its ditserve.json; returns them.

    prompts: default calibration_prompts(); steps: default the model's default_steps.
    """
    folder = ModelFolder(model_dir)
    prompts = list(prompts) if prompts is not None else calibration_prompts()
    steps = steps or folder.defaults.steps
    torch_device = resolve_device(device)
    model = LocalFlux(folder, torch_device, resolve_dtype(dtype, torch_device))
    fit = fit_teacache(model, prompts, steps)
    store_teacache_coefficients(
        folder.path,
        fit.coefficients,
        prompts=len(prompts),
        steps=steps,
        samples=len(fit.input_changes),
        input_change_range=[min(fit.input_changes), max(fit.input_changes)],  # where the fit holds
        true_cfg_scale=folder.defaults.true_cfg_scale,
    )
    return fit.coefficients
