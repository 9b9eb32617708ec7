"""The harnesses `ditserve bench cache` times its rows in: our loop, and the family's pipeline for the peers.

Timing. Rows run interleaved: each round runs every row over the timed set, starting one row later
than the round before; before its prompt set, every row makes one untimed image (so no row pays a first
call after installing its hooks). A row's time per image (or clip) is the mean over prompts of each
prompt's median over rounds, which a burst of load from elsewhere moves less than a median of round means.
Ours times the runner's trajectory creation (noise, scheduler copy, timesteps) and every step. A pipeline
row times one call of the family's diffusers pipeline (FluxPipeline, WanPipeline) given the same parsed
request's embeddings and settings (so no text encoding; ModelFamily.pipeline_arguments) with
output_type="latent" (so no VAE decode): noise, timesteps and the loop. Installing and removing a peer's
hooks happens between prompt sets, untimed. Speedup is against the uncached row of the same harness; both
baselines are reported and should agree. Each harness has its own copy of the transformer, and cache-dit
a third: its disable_cache keeps the forward it patched into the transformer.

Skipped block evaluations: ours from RequestCache; a pipeline row counts block bodies that ran, through
forward hooks on each block's first norm layer (diffusers' hooks replace a block's forward, so a hook on
the block itself would also count the calls they skip), against steps x CFG branches x blocks; the
blocks are the family's profiled_blocks.
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
    from diffusers import DiffusionPipeline

    from ditserve.services.families.family import ModelFamily
    from ditserve.services.tools.local_model import LocalModel
    from ditserve.v1.encoder_pb2 import PromptEmbedding


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_cache_config(row: Row, dtype: torch.dtype, steps: int, mag_ratios: list[float] | None) -> object:
    """The diffusers hook config of a row, for the pipeline's transformer or our loop's."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if row.method == "fbc":
        return FirstBlockCacheConfig(threshold=row.hook["threshold"])
    if row.method == "taylorseer-lite":
        return TaylorSeerCacheConfig(
            cache_interval=int(row.hook["cache_interval"]), use_lite_mode=True, taylor_factors_dtype=dtype
        )
    return MagCacheConfig(threshold=row.hook["threshold"], num_inference_steps=steps, mag_ratios=mag_ratios)


class OurHarness:
    """Our rows: the denoiser's own loop, in this process. mag_ratios: MagCache's calibration (the pipeline
    harness measures it), for its hooks in our loop."""

    def __init__(self, model: LocalModel, steps: int, mag_ratios: list[float] | None = None) -> None:
        self.model = model
        self.steps = steps
        self.mag_ratios = mag_ratios
        self.counter: BlockCounter | None = None  # while a peer's hooks are installed

    def install(self, row: Row) -> None:
        """Our policies travel with each request; a peer's hooks go on our transformer, and every runner
        call into a CFG branch's cache context, as the pipelines' loops do (the runner's _predict is one
        branch's call)."""
        if row.peer != PEER_IN_OURS:
            return
        runner = self.model.runner
        transformer = runner.executor.transformer
        transformer.enable_cache(diffusers_cache_config(row, runner.dtype, self.steps, self.mag_ratios))
        predict = runner._predict

        def in_context(trajectories: list[Any], negative: bool) -> list[torch.Tensor]:
            with transformer.cache_context("uncond" if negative else "cond"):
                return predict(trajectories, negative)

        runner._predict = in_context
        self.counter = BlockCounter(self.model.family, transformer)

    def uninstall(self, row: Row) -> None:
        if row.peer != PEER_IN_OURS:
            return
        runner = self.model.runner
        del runner._predict  # the instance attribute: the class's method again
        runner.executor.transformer.disable_cache()
        if self.counter is not None:
            self.counter.remove()
            self.counter = None

    def run(self, row: Row, prompt: PromptEmbedding, seed: int) -> tuple[float, Any, float]:
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
            branches = 2 if self.model.uses_cfg else 1
            return seconds, trajectory.result(), 1.0 - self.counter.count / (steps * branches * self.counter.blocks)
        skipped = 1 - (1 - trajectory.cache.skipped_fraction) * steps / self.steps
        return seconds, trajectory.result(), skipped


class BlockCounter:
    """Counts transformer-block bodies run, via each block's first norm layer (see the module docstring)."""

    def __init__(self, family: ModelFamily, transformer: torch.nn.Module) -> None:
        self.count = 0
        blocks = [block for group in family.profiled_blocks(transformer).values() for block in group]
        norms = [next(child for name, child in block.named_children() if name.startswith("norm")) for block in blocks]
        self.blocks = len(norms)
        self.handles = [norm.register_forward_hook(self._hit) for norm in norms]

    def _hit(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PipelineHarness:
    """The peers' rows: the family's diffusers pipeline, one per peer library, each with its own copy of the
    transformer, the VAE shared (output_type="latent" never decodes)."""

    def __init__(self, model: LocalModel, steps: int) -> None:
        self.model = model
        self.steps = steps
        self.pipes: dict[str, tuple[DiffusionPipeline, BlockCounter]] = {}
        self.mag_ratios: list[float] | None = None

    def pipe(self, peer: str) -> tuple[DiffusionPipeline, BlockCounter]:
        if peer not in self.pipes:
            model = self.model
            transformer = model.family.load_transformer(model.folder, model.device, model.dtype)
            pipe = model_pipeline(model, transformer)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[peer] = (pipe, BlockCounter(model.family, transformer))
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
                    enable_separate_cfg=True if self.model.uses_cfg else None,
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
            pipe.transformer.enable_cache(diffusers_cache_config(row, self.model.dtype, self.steps, self.mag_ratios))

    def uninstall(self, row: Row) -> None:
        pipe, _ = self.pipe(row.peer)
        if row.peer == "cache-dit":
            import cache_dit

            cache_dit.disable_cache(pipe)
        elif row.method != "none":
            pipe.transformer.disable_cache()

    def run(self, row: Row, prompt: PromptEmbedding, seed: int) -> tuple[float, Any, float]:
        pipe, counter = self.pipe(row.peer)
        arguments = self.model.family.pipeline_arguments(self.model.inputs(prompt, seed, self.steps))
        counter.count = 0
        started = time.perf_counter()
        latents = pipe(**arguments, output_type="latent", return_dict=False)[0]
        _synchronize(self.model.device)
        seconds = time.perf_counter() - started
        uncached = self.steps * (2 if self.model.uses_cfg else 1) * counter.blocks
        return seconds, latents, 1.0 - counter.count / uncached

    def calibrate_magcache(self, prompts: Sequence[PromptEmbedding]) -> list[float]:
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


def model_pipeline(model: LocalModel, transformer: torch.nn.Module) -> DiffusionPipeline:
    """The family's diffusers pipeline (model_index.json's class) around this transformer, the model's VAE and
    the folder's scheduler, without text encoders: a peer is given the embeddings our encoder made."""
    import diffusers

    # model_index.json: components are [library, class] pairs; other keys are the pipeline's own settings.
    settings = {key: value for key, value in model.folder.index.items() if not key.startswith("_")}
    components = {key: None if isinstance(value, list) else value for key, value in settings.items()}
    components.update(transformer=transformer, vae=model.decoder.vae, scheduler=model.folder.load("scheduler"))
    return getattr(diffusers, model.folder.index["_class_name"])(**components)
