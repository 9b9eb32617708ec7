"""FLUX-family specifics in one place: latent geometry, packing, the sigma schedule.

The denoiser and the VAE both speak packed latents [batch, tokens, channels*4];
these helpers reuse FluxPipeline's own static methods so a served image is the
one FluxPipeline makes in-process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_size(pixels: int, scale: int) -> int:
    """Latent side length: VAE compression, rounded so 2x2 packing divides it."""
    return 2 * (pixels // (scale * 2))


def image_tokens(height: int, width: int, scale: int) -> int:
    """Tokens of one image: 2x2 patches of the latent."""
    return latent_size(height, scale) * latent_size(width, scale) // 4


def initial_latents(
    *,
    num_images: int,
    channels: int,
    height: int,
    width: int,
    scale: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise drawn exactly as FluxPipeline.prepare_latents draws it; returns (packed latents, image ids)."""
    h, w = latent_size(height, scale), latent_size(width, scale)
    noise = randn_tensor((num_images, channels, h, w), generator=generator, device=device, dtype=dtype)
    packed = FluxPipeline._pack_latents(noise, num_images, channels, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(num_images, h // 2, w // 2, device, dtype)
    return packed, image_ids


def text_ids(sequence_length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def set_timesteps(scheduler: Any, steps: int, image_tokens: int, device: torch.device) -> torch.Tensor:
    """FluxPipeline's schedule: linear sigmas, resolution-dependent shift `mu`."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


def unpack_latents(latents: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    return FluxPipeline._unpack_latents(latents, height, width, scale)
