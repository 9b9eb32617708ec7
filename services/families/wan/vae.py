"""Wan's VAE side: unpacked latents [batch, 16, frames', height/8, width/8], de-normalised and decoded."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.video_processor import VideoProcessor

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.stage import StageContext


class WanVaeDecoder:
    video = True

    def __init__(self, stage: StageContext) -> None:
        self.stage = stage
        self.vae = stage.folder.load("vae", stage.device, stage.dtype)
        config = self.vae.config
        self.scale_factor = config.scale_factor_spatial
        self.temporal_factor = config.scale_factor_temporal
        self.processor = VideoProcessor(vae_scale_factor=self.scale_factor)
        shape = (1, config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(config.latents_mean).view(shape)
        self.inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape)

    def latent_shape(self, height: int, width: int, num_frames: int) -> list[int]:
        frames = (num_frames - 1) // self.temporal_factor + 1
        return [self.vae.config.z_dim, frames, height // self.scale_factor, width // self.scale_factor]

    def check_latents(self, latents: torch.Tensor, height: int, width: int, num_frames: int) -> None:
        expected = self.latent_shape(height, width, num_frames)
        max_videos = self.stage.limits.max_num_images
        if latents.ndim != 5 or list(latents.shape[1:]) != expected or not 1 <= latents.shape[0] <= max_videos:
            raise InvalidArgument(
                "latents.shape",
                f"{list(latents.shape)} is not [1..{max_videos}, {', '.join(map(str, expected))}]"
                f" for {num_frames} frames of {height}x{width}",
            )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int, num_frames: int) -> np.ndarray:
        """uint8 frames [batch, frames, height, width, 3], as WanPipeline's decode and postprocessing."""
        device, dtype = self.stage.device, self.stage.dtype
        latents = latents.to(device, dtype)
        latents = latents / self.inverse_std.to(device, dtype) + self.mean.to(device, dtype)
        video = self.vae.decode(latents, return_dict=False)[0]
        frames = self.processor.postprocess_video(video, output_type="np")
        return (frames * 255).round().astype(np.uint8)
