"""FLUX's VAE side: packed latents [batch, tokens, channels*4] unpacked, de-normalised and decoded."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.stage import StageContext
from ditserve.services.families.flux import latents as flux


class FluxVaeDecoder:
    video = False

    def __init__(self, stage: StageContext) -> None:
        self.stage = stage
        self.vae = stage.folder.load("vae", stage.device, stage.dtype)
        self.scale_factor = flux.vae_scale_factor(self.vae.config)
        self.processor = VaeImageProcessor(vae_scale_factor=self.scale_factor * 2)

    def check_latents(self, latents: torch.Tensor, height: int, width: int) -> None:
        """FLUX's packed layout: (h/2)(w/2) tokens of 4 x latent_channels each, h and w the latent sides."""
        h = flux.latent_size(height, self.scale_factor)
        w = flux.latent_size(width, self.scale_factor)
        expected = [(h // 2) * (w // 2), self.vae.config.latent_channels * 4]
        max_images = self.stage.limits.max_num_images
        if latents.ndim != 3 or list(latents.shape[1:]) != expected or not 1 <= latents.shape[0] <= max_images:
            raise InvalidArgument(
                "latents.shape",
                f"{list(latents.shape)} is not [1..{max_images}, {expected[0]}, {expected[1]}] for {height}x{width}",
            )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        """uint8 pixels [batch, height, width, 3], as FluxPipeline's postprocessing makes them."""
        unpacked = flux.unpack_latents(latents, height, width, self.scale_factor)
        config = self.vae.config
        unpacked = unpacked / config.scaling_factor + config.shift_factor
        decoded = self.vae.decode(unpacked.to(self.stage.device, self.stage.dtype), return_dict=False)[0]
        pixels = self.processor.postprocess(decoded, output_type="np")
        return (pixels * 255).round().astype(np.uint8)
