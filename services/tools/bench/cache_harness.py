"""The harnesses `ditserve bench cache` times its rows in: our loop, and FluxPipeline for the peers.

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

Skipped block evaluations: ours from RequestCache; a pipeline row counts block bodies that ran, through
forward hooks on each block's first norm layer (diffusers' hooks replace a block's forward, so a hook on
the block itself would also count the calls they skip), against steps x CFG branches x blocks.
"""

from __future__ import annotations

import ast
import contextlib
import io
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ditserve.services.tools.bench.cache_rows import CONTROL_NUDGE, PEER_IN_OURS, Row

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline

    from ditserve.services.families.flux.runner import Conditioning
    from ditserve.services.tools.calibrate import LocalFlux


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_cache_config(row: Row, dtype: torch.dtype, steps: int, mag_ratios: list[float] | None) -> object:
    """The diffusers hook config of a row, for FluxPipeline's transformer or our loop's."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if row.method == "fbc":
        return FirstBlockCacheConfig(threshold=row.hook["threshold"])
    if row.method == "taylorseer-lite":
        return TaylorSeerCacheConfig(
            cache_interval=int(row.hook["cache_interval"]), use_lite_mode=True, taylor_factors_dtype=dtype
        )
    return MagCacheConfig(threshold=row.hook["threshold"], num_inference_steps=steps, mag_ratios=mag_ratios)


class OurHarness:
    """Our rows: the denoiser's own loop, in this process."""

    def __init__(self, model: LocalFlux, steps: int) -> None:
        self.model = model
        self.steps = steps
        self.counter: BlockCounter | None = None  # while a peer's hooks are installed

    def install(self, row: Row) -> None:
        """Our policies travel with each request; a peer's hooks go on our transformer, and every runner
        call into a CFG branch's cache context, as FluxPipeline's loop does (the runner's _predict is one
        branch's call)."""
        if row.peer != PEER_IN_OURS:
            return
        runner = self.model.runner
        transformer = runner.executor.transformer
        transformer.enable_cache(diffusers_cache_config(row, runner.dtype, self.steps, None))
        predict = runner._predict

        def in_context(trajectories: list[Any], negative: bool) -> list[torch.Tensor]:
            with transformer.cache_context("uncond" if negative else "cond"):
                return predict(trajectories, negative)

        runner._predict = in_context
        self.counter = BlockCounter(transformer)

    def uninstall(self, row: Row) -> None:
        if row.peer != PEER_IN_OURS:
            return
        runner = self.model.runner
        del runner._predict  # the instance attribute: the class's method again
        runner.executor.transformer.disable_cache()
        if self.counter is not None:
            self.counter.remove()
            self.counter = None

    def run(self, row: Row, prompt: Conditioning, seed: int) -> tuple[float, Any, float]:
        """A fewer-steps row skips, against the bench's step count, the steps it never runs."""
        steps = row.steps or self.steps
        inputs = self.model.inputs(prompt, seed, steps, row.cache)
        started = time.perf_counter()
        if self.counter is not None:
            self.counter.count = 0
        trajectory = self.model.denoise(inputs, nudge=CONTROL_NUDGE if row.method == "control" else 0.0)
        _synchronize(self.model.device)
        seconds = time.perf_counter() - started
        if self.counter is not None:  # a peer's hooks: what they skipped, then their state reset per image
            self.model.runner.executor.transformer._reset_stateful_cache()
            branches = 2 if self.model.negative is not None else 1
            return seconds, trajectory.result(), 1.0 - self.counter.count / (steps * branches * self.counter.blocks)
        skipped = 1 - (1 - trajectory.cache.skipped_fraction) * steps / self.steps
        return seconds, trajectory.result(), skipped


class BlockCounter:
    """Counts transformer-block bodies run, via each block's first norm layer (see the module docstring)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.count = 0
        norms = [block.norm1 for block in transformer.transformer_blocks]
        norms += [block.norm for block in transformer.single_transformer_blocks]
        self.blocks = len(norms)
        self.handles = [norm.register_forward_hook(self._hit) for norm in norms]

    def _hit(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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
            pipe.transformer.enable_cache(
                diffusers_cache_config(row, self.model.runner.dtype, self.steps, self.mag_ratios)
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
