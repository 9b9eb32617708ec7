"""Runs FLUX-family denoising for one job, step by step, exactly as FluxPipeline does.

Each job owns its generator (so its noise never depends on other traffic) and
its own scheduler copy (so per-request sigma state never leaks between jobs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ditserve.services.common import flux
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.cache.flux_blocks import FluxBlockExecutor
from ditserve.services.denoiser.cache.policy import FLUX1_TEACACHE_COEFFICIENTS, CacheConfig
from ditserve.services.denoiser.cache.state import RequestCache, Slot, forward_batch
from ditserve.services.denoiser.job import DenoiseJob


@dataclass(frozen=True)
class Conditioning:
    embeds: torch.Tensor  # [1, sequence, joint_attention_dim]
    pooled: torch.Tensor  # [1, pooled_projection_dim]

    def repeated(self, n: int) -> Conditioning:
        """FluxPipeline's num_images_per_prompt expansion."""
        _, seq, dim = self.embeds.shape
        return Conditioning(self.embeds.repeat(1, n, 1).view(n, seq, dim), self.pooled.repeat(1, n).view(n, -1))


@dataclass(frozen=True)
class FluxInputs:
    prompt: Conditioning
    negative: Conditioning | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    num_images: int
    cache: CacheConfig = field(default_factory=CacheConfig)


class FluxTrajectory:
    def __init__(self, runner: FluxRunner, inputs: FluxInputs) -> None:
        self.runner = runner
        device, dtype, n = runner.device, runner.dtype, inputs.num_images
        generator = torch.Generator("cpu").manual_seed(inputs.seed)  # device-independent noise
        self.latents, self.image_ids = flux.initial_latents(
            num_images=n,
            channels=runner.transformer.config.in_channels // 4,
            height=inputs.height,
            width=inputs.width,
            scale=runner.vae_scale,
            generator=generator,
            device=device,
            dtype=dtype,
        )
        self.scheduler = type(runner.scheduler).from_config(runner.scheduler.config)
        self.timesteps = flux.set_timesteps(self.scheduler, inputs.steps, self.latents.shape[1], device)
        self.prompt = _to(inputs.prompt.repeated(n), device, dtype)
        self.negative = _to(inputs.negative.repeated(n), device, dtype) if inputs.negative is not None else None
        self.true_cfg_scale = inputs.true_cfg_scale
        self.text_ids = flux.text_ids(self.prompt.embeds.shape[1], device, dtype)
        self.guidance = None
        if runner.transformer.config.guidance_embeds:
            self.guidance = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32).expand(n)
        self.cache = RequestCache(inputs.cache, runner.executor)
        self.caching = inputs.cache.mode != "none"
        self.index = 0

    @property
    def timestep(self) -> torch.Tensor:
        """This sample's current timestep, one per image, as FluxPipeline broadcasts it."""
        return self.timesteps[self.index].expand(self.latents.shape[0]).to(self.latents.dtype)

    def advance(self, noise: torch.Tensor, negative_noise: torch.Tensor | None) -> None:
        """Applies true CFG (if any) and this trajectory's own scheduler step."""
        if negative_noise is not None:
            noise = negative_noise + self.true_cfg_scale * (noise - negative_noise)
        self.latents = self.scheduler.step(noise, self.timesteps[self.index], self.latents, return_dict=False)[0]
        self.index += 1
        if not torch.isfinite(self.latents).all():
            raise FloatingPointError("the latents became NaN or Inf")

    def result(self) -> torch.Tensor:
        return self.latents

    def computed_steps(self) -> dict[str, str]:
        """Per CFG branch, '1' for each step the transformer computed and '0' for each it reused."""
        if not self.caching:
            return {}
        return {name: "".join("1" if d else "0" for d in ds) for name, ds in self.cache.decisions().items()}


def _to(cond: Conditioning, device: torch.device, dtype: torch.dtype) -> Conditioning:
    return Conditioning(cond.embeds.to(device, dtype), cond.pooled.to(device, dtype))


class CallMirror(Protocol):
    """Replays each transformer call on other processes: sequence parallelism (parallel/serving.py)."""

    def announce(
        self, trajectories: list[FluxTrajectory], branch: str, caching: bool, inputs: dict[str, torch.Tensor | None]
    ) -> None: ...

    def fail(self, error: Exception) -> Exception:
        """The error every trajectory of a failed call ends with: the other ranks' state is lost."""
        ...


class FluxRunner:
    """Holds the transformer and the scheduler template; makes one trajectory per job.

    Under sequence parallelism `transformer` is a SequenceParallelFlux, `executor` its executor, and
    `mirror` announces each call to the other ranks before rank 0 makes it.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: object,
        vae_scale: int,
        device: torch.device,
        dtype: torch.dtype,
        teacache_coefficients: tuple[float, ...] | None = FLUX1_TEACACHE_COEFFICIENTS,
        on_cache_step: Callable[[str, bool], None] | None = None,
        executor: FluxBlockExecutor | None = None,
        mirror: CallMirror | None = None,
    ) -> None:
        self.transformer = transformer
        self.executor = executor or FluxBlockExecutor(transformer, teacache_coefficients)
        self.mirror = mirror
        self.on_cache_step = on_cache_step
        self.scheduler = scheduler
        self.vae_scale = vae_scale
        self.device = device
        self.dtype = dtype

    def batch_key(self, job: DenoiseJob, config: BatchingConfig) -> tuple:
        """What must match to share a transformer call: latent and text shapes, CFG, and for
        request-level (dynamic) batches the step count, so members finish together."""
        inputs: FluxInputs = job.inputs
        steps = inputs.steps if config.mode == "dynamic" else None
        return (
            inputs.height,
            inputs.width,
            inputs.prompt.embeds.shape[1],
            inputs.negative is not None,
            steps,
        )

    def cost(self, job: DenoiseJob) -> int:
        """Image tokens the transformer processes per step for this job."""
        inputs: FluxInputs = job.inputs
        branches = 2 if inputs.negative is not None else 1
        return self.image_tokens(inputs.height, inputs.width) * inputs.num_images * branches

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens of one image: 2x2 patches of the latent."""
        return flux.latent_size(height, self.vae_scale) * flux.latent_size(width, self.vae_scale) // 4

    def start(self, job: DenoiseJob) -> FluxTrajectory:
        return FluxTrajectory(self, job.inputs)

    def _predict(self, trajectories: list[FluxTrajectory], negative: bool) -> list[torch.Tensor]:
        """One transformer call over the trajectories' samples, split back per trajectory."""
        first = trajectories[0]
        branch = "uncond" if negative else "cond"
        conds = [t.negative if negative else t.prompt for t in trajectories]
        guidance = [t.guidance for t in trajectories]
        inputs = {
            "hidden_states": _cat([t.latents for t in trajectories]),
            "timestep": _cat([t.timestep for t in trajectories]) / 1000,
            "guidance": None if guidance[0] is None else _cat(guidance),
            "pooled_projections": _cat([c.pooled for c in conds]),
            "encoder_hidden_states": _cat([c.embeds for c in conds]),
            "txt_ids": first.text_ids,
            "img_ids": first.image_ids,
        }
        caches = [t.cache.branch(branch) for t in trajectories]
        caching = any(t.caching for t in trajectories)
        if self.mirror is not None:
            self.mirror.announce(trajectories, branch, caching, inputs)
        if caching:
            slots = [
                Slot(cache, t.index, len(t.timesteps), t.latents.shape[0])
                for cache, t in zip(caches, trajectories, strict=True)
            ]
            noise = forward_batch(self.executor, slots, **inputs)
        else:  # the transformer's own forward: bit-exact with FluxPipeline
            noise = self.transformer(**inputs, return_dict=False)[0]
            for cache in caches:
                cache.record(True)
        if self.on_cache_step is not None:
            for cache, t in zip(caches, trajectories, strict=True):
                if t.caching:
                    self.on_cache_step(t.cache.config.mode, cache.decisions[-1])
        return list(noise.split([t.latents.shape[0] for t in trajectories]))

    @torch.inference_mode()
    def step(self, trajectories: list[FluxTrajectory]) -> list[Exception | None]:
        """One step for a batch; returns, per trajectory, the error that failed it.

        Alone, this is FluxPipeline's exact call sequence (bit-exact); together, one transformer
        call per CFG branch for all samples. If a batched call raises, each trajectory is retried
        alone so only the culprit fails: no trajectory has moved before every prediction exists.
        Not with a mirror: the other ranks may be left inside a collective, so the call fails them all.
        """
        try:
            noise = self._predict(trajectories, negative=False)
            cfg = trajectories[0].negative is not None
            negative = self._predict(trajectories, negative=True) if cfg else [None] * len(trajectories)
        except Exception as error:
            if self.mirror is not None:
                return [self.mirror.fail(error)] * len(trajectories)
            if len(trajectories) == 1:
                return [error]
            return [self.step([trajectory])[0] for trajectory in trajectories]
        errors: list[Exception | None] = []
        for trajectory, cond, uncond in zip(trajectories, noise, negative, strict=True):
            try:
                trajectory.advance(cond, uncond)
                errors.append(None)
            except Exception as error:
                errors.append(error)
        return errors


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
