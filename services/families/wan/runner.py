"""Wan's side of the denoiser's runner: how a job starts and what its transformer call takes.

As WanPipeline does it: noise [n, 16, (frames - 1) / 4 + 1, height / 8, width / 8] in float32 from the
job's CPU generator, the UniPC flow-matching schedule, the latents cast to the transformer's dtype for
each call (the scheduler steps them in float32), classic CFG with the negative prompt's embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ditserve.services.common.limits import RequestLimits
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.runner import Trajectory, TransformerRunner, cat


@dataclass(frozen=True)
class WanInputs:
    prompt: torch.Tensor  # UMT5 embedding [1, text_tokens, text_dim]
    negative: torch.Tensor | None
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float  # classic CFG, as WanPipeline names it
    seed: int
    num_images: int
    cache: CacheConfig = field(default_factory=CacheConfig)


class WanTrajectory(Trajectory):
    def __init__(self, runner: WanRunner, inputs: WanInputs) -> None:
        n, device, dtype = inputs.num_images, runner.device, runner.dtype
        generator = torch.Generator("cpu").manual_seed(inputs.seed)  # device-independent noise
        shape = (n, runner.latent_channels, *runner.latent_grid(inputs.num_frames, inputs.height, inputs.width))
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        scheduler = type(runner.scheduler).from_config(runner.scheduler.config)
        scheduler.set_timesteps(inputs.steps, device=device)
        scheduler.set_begin_index(0)
        super().__init__(
            latents,
            scheduler,
            scheduler.timesteps,
            runner.new_cache(inputs.cache),
            inputs.guidance_scale,
            has_negative=inputs.negative is not None,
        )
        self.prompt = _repeated(inputs.prompt, n).to(device, dtype)
        self.negative = _repeated(inputs.negative, n).to(device, dtype) if inputs.negative is not None else None


def _repeated(embeds: torch.Tensor, n: int) -> torch.Tensor:
    """WanPipeline's num_videos_per_prompt expansion."""
    _, seq, dim = embeds.shape
    return embeds.repeat(1, n, 1).view(n, seq, dim)


def latent_grid(
    num_frames: int, height: int, width: int, temporal_factor: int, spatial_factor: int
) -> tuple[int, int, int]:
    """The VAE's latent frames, height and width for a clip."""
    return (num_frames - 1) // temporal_factor + 1, height // spatial_factor, width // spatial_factor


def clip_tokens(grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> int:
    """Tokens of one clip's latent grid after the transformer's 3D patching."""
    return (grid[0] // patch_size[0]) * (grid[1] // patch_size[1]) * (grid[2] // patch_size[2])


class WanRunner(TransformerRunner):
    """TransformerRunner for WanTransformer3DModel: unpacked 5-D latents, classic CFG."""

    def __init__(
        self,
        *args: Any,
        latent_channels: int,
        spatial_factor: int,
        temporal_factor: int,
        patch_size: tuple[int, int, int],
        transformer_config: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.latent_channels = latent_channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.patch_size = patch_size
        self.transformer_config = transformer_config

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return latent_grid(num_frames, height, width, self.temporal_factor, self.spatial_factor)

    def video_tokens(self, num_frames: int, height: int, width: int) -> int:
        return clip_tokens(self.latent_grid(num_frames, height, width), self.patch_size)

    def parse(self, request: Any, cache: CacheConfig, limits: RequestLimits) -> WanInputs:
        from ditserve.services.families.wan.requests import parse_request

        return parse_request(request, cache, self, limits)

    def token_counts(self, inputs: WanInputs) -> dict[str, int]:
        """Only the video tokens are sharded; the text is replicated (parallel.py)."""
        return {"num_frames/height/width": self.video_tokens(inputs.num_frames, inputs.height, inputs.width)}

    def shape_key(self, inputs: WanInputs) -> tuple:
        return (inputs.num_frames, inputs.height, inputs.width, inputs.prompt.shape[1], inputs.negative is not None)

    def cost(self, inputs: WanInputs) -> int:
        branches = 2 if inputs.negative is not None else 1
        return self.video_tokens(inputs.num_frames, inputs.height, inputs.width) * inputs.num_images * branches

    def start(self, job: DenoiseJob) -> WanTrajectory:
        return WanTrajectory(self, job.inputs)

    def model_inputs(self, trajectories: list[WanTrajectory], negative: bool) -> dict[str, torch.Tensor | None]:
        return {
            "hidden_states": cat([t.latents.to(self.dtype) for t in trajectories]),
            "timestep": cat([t.timesteps[t.index].expand(t.rows) for t in trajectories]),
            "encoder_hidden_states": cat([t.negative if negative else t.prompt for t in trajectories]),
        }
