"""FLUX's side of the denoiser's runner: how a job starts and what its transformer call takes.

Noise, packing, ids and the sigma schedule are FluxPipeline's own (latents.py), so a served image is the
one FluxPipeline makes in-process; the stepping itself is the family-neutral TransformerRunner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.services.common.limits import RequestLimits
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.runner import Trajectory, TransformerRunner, cat
from ditserve.services.families.flux import latents as flux


@dataclass(frozen=True)
class Conditioning:
    embeds: torch.Tensor  # [1, sequence, joint_attention_dim]
    pooled: torch.Tensor  # [1, pooled_projection_dim]

    def repeated(self, n: int) -> Conditioning:
        """FluxPipeline's num_images_per_prompt expansion."""
        _, seq, dim = self.embeds.shape
        return Conditioning(self.embeds.repeat(1, n, 1).view(n, seq, dim), self.pooled.repeat(1, n).view(n, -1))

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.embeds.to(device, dtype), self.pooled.to(device, dtype))


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

    @property
    def num_frames(self) -> int:
        return 1  # an image


class FluxTrajectory(Trajectory):
    def __init__(self, runner: FluxRunner, inputs: FluxInputs) -> None:
        device, dtype, n = runner.device, runner.dtype, inputs.num_images
        generator = torch.Generator("cpu").manual_seed(inputs.seed)  # device-independent noise
        latents, self.image_ids = flux.initial_latents(
            num_images=n,
            channels=runner.latent_channels,
            height=inputs.height,
            width=inputs.width,
            scale=runner.vae_scale,
            generator=generator,
            device=device,
            dtype=dtype,
        )
        scheduler = type(runner.scheduler).from_config(runner.scheduler.config)
        timesteps = flux.set_timesteps(scheduler, inputs.steps, latents.shape[1], device)
        super().__init__(
            latents,
            scheduler,
            timesteps,
            runner.new_cache(inputs.cache),
            inputs.true_cfg_scale,
            has_negative=inputs.negative is not None,
        )
        self.prompt = inputs.prompt.repeated(n).to(device, dtype)
        self.negative = inputs.negative.repeated(n).to(device, dtype) if inputs.negative is not None else None
        self.text_ids = flux.text_ids(self.prompt.embeds.shape[1], device, dtype)
        self.guidance = None
        if runner.guidance_embeds:
            self.guidance = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32).expand(n)

    @property
    def timestep(self) -> torch.Tensor:
        """This sample's current timestep, one per image, as FluxPipeline broadcasts it."""
        return self.timesteps[self.index].expand(self.rows).to(self.latents.dtype)


class FluxRunner(TransformerRunner):
    """TransformerRunner for FluxTransformer2DModel: packed latents, true CFG, guidance embedding."""

    shared_inputs = frozenset({"txt_ids", "img_ids"})  # one text and one image position grid per call

    def __init__(
        self,
        *args: Any,
        vae_scale: int,
        latent_channels: int,
        guidance_embeds: bool,
        transformer_config: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.vae_scale = vae_scale
        self.latent_channels = latent_channels
        self.guidance_embeds = guidance_embeds
        self.transformer_config = transformer_config

    def parse(self, request: Any, cache: CacheConfig, limits: RequestLimits) -> FluxInputs:
        from ditserve.services.families.flux.requests import parse_request

        return parse_request(request, cache, self.facts.defaults, limits, self.transformer_config)

    def token_counts(self, inputs: FluxInputs) -> dict[str, int]:
        """Both streams are sharded under sequence parallelism: text tokens and image tokens."""
        return {
            "prompt.prompt_embeds": inputs.prompt.embeds.shape[1],
            "height/width": self.image_tokens(inputs.height, inputs.width),
        }

    def shape_key(self, inputs: FluxInputs) -> tuple:
        return (inputs.height, inputs.width, inputs.prompt.embeds.shape[1], inputs.negative is not None)

    def cost(self, inputs: FluxInputs) -> int:
        branches = 2 if inputs.negative is not None else 1
        return self.image_tokens(inputs.height, inputs.width) * inputs.num_images * branches

    def image_tokens(self, height: int, width: int) -> int:
        return flux.image_tokens(height, width, self.vae_scale)

    def start(self, job: DenoiseJob) -> FluxTrajectory:
        return FluxTrajectory(self, job.inputs)

    def model_inputs(self, trajectories: list[FluxTrajectory], negative: bool) -> dict[str, torch.Tensor | None]:
        first = trajectories[0]
        conds = [t.negative if negative else t.prompt for t in trajectories]
        guidance = [t.guidance for t in trajectories]
        return {
            "hidden_states": cat([t.latents for t in trajectories]),
            "timestep": cat([t.timestep for t in trajectories]) / 1000,
            "guidance": None if guidance[0] is None else cat(guidance),
            "pooled_projections": cat([c.pooled for c in conds]),
            "encoder_hidden_states": cat([c.embeds for c in conds]),
            "txt_ids": first.text_ids,
            "img_ids": first.image_ids,
        }
