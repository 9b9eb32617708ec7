"""Runs FLUX-family denoising for one job, step by step, exactly as FluxPipeline does.

Each job owns its generator (so its noise never depends on other traffic) and
its own scheduler copy (so per-request sigma state never leaks between jobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditserve.services.common import flux
from ditserve.services.denoiser.job import DenoiseJob


@dataclass(frozen=True)
class Conditioning:
    embeds: torch.Tensor  # [1, sequence, joint_attention_dim]
    pooled: torch.Tensor  # [1, pooled_projection_dim]

    def repeated(self, n: int) -> Conditioning:
        """FluxPipeline's num_images_per_prompt expansion."""
        _, seq, dim = self.embeds.shape
        return Conditioning(
            self.embeds.repeat(1, n, 1).view(n, seq, dim), self.pooled.repeat(1, n).view(n, -1)
        )


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
        self.negative = (
            _to(inputs.negative.repeated(n), device, dtype) if inputs.negative is not None else None
        )
        self.true_cfg_scale = inputs.true_cfg_scale
        self.text_ids = flux.text_ids(self.prompt.embeds.shape[1], device, dtype)
        self.guidance = None
        if runner.transformer.config.guidance_embeds:
            self.guidance = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32).expand(
                n
            )
        self.index = 0

    def _predict(self, cond: Conditioning, timestep: torch.Tensor) -> torch.Tensor:
        return self.runner.transformer(
            hidden_states=self.latents,
            timestep=timestep / 1000,
            guidance=self.guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=self.text_ids,
            img_ids=self.image_ids,
            return_dict=False,
        )[0]

    @torch.inference_mode()
    def step(self) -> None:
        t = self.timesteps[self.index]
        timestep = t.expand(self.latents.shape[0]).to(self.latents.dtype)
        noise = self._predict(self.prompt, timestep)
        if self.negative is not None:
            negative = self._predict(self.negative, timestep)
            noise = negative + self.true_cfg_scale * (noise - negative)
        self.latents = self.scheduler.step(noise, t, self.latents, return_dict=False)[0]
        self.index += 1

    def result(self) -> torch.Tensor:
        return self.latents


def _to(cond: Conditioning, device: torch.device, dtype: torch.dtype) -> Conditioning:
    return Conditioning(cond.embeds.to(device, dtype), cond.pooled.to(device, dtype))


class FluxRunner:
    """Holds the transformer and the scheduler template; makes one trajectory per job."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: object,
        vae_scale: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae_scale = vae_scale
        self.device = device
        self.dtype = dtype

    def start(self, job: DenoiseJob) -> FluxTrajectory:
        return FluxTrajectory(self, job.inputs)
