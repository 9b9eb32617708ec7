"""One model folder's encoder, denoiser and VAE in this process, through the roles' own code paths.

Calibration and `ditserve bench cache` measure what the services serve, for any family: prompts are
encoded by the family's text encoder as the encoder role encodes them, each run is a DenoiseRequest the
family's runner parses as the denoiser does (the folder's defaults, classic CFG with the empty negative
prompt the gateway sends when the model's CFG scale is above 1), and latents become pixels through the
family's VAE decoder as the VAE role decodes them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch

from ditserve.services.common.device import resolve_device, resolve_dtype
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.model import ModelFolder
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.runner import Trajectory, TransformerRunner
from ditserve.services.families import load_family
from ditserve.services.families.base import VaeDecoder
from ditserve.v1 import denoiser_pb2, encoder_pb2

NUDGE_SEED = 1_000_003  # offsets a request's seed for LocalModel.denoise's nudge


class LocalModel:
    """The family's text encoder, its runner over the transformer, and (on first use) its VAE decoder."""

    def __init__(
        self, folder: ModelFolder, device: torch.device, dtype: torch.dtype, limits: RequestLimits | None = None
    ) -> None:
        self.folder = folder
        self.defaults = folder.defaults
        self.device = device
        self.dtype = dtype
        self.limits = limits or RequestLimits()
        self.family = load_family(folder)
        self.text = self.family.text_encoder(folder, device, dtype)
        # The encoder role's default sequence length (services/encoder/service.py).
        self.sequence_length = min(
            self.defaults.max_sequence_length, self.limits.max_sequence_length, self.text.max_sequence_length
        )
        executor = self.family.executor(self.family.load_transformer(folder, device, dtype))
        facts = ModelFacts.load(folder, self.family.published_teacache_coefficients, executor.num_blocks)
        self.runner: TransformerRunner = self.family.runner(
            executor.transformer, executor, folder, device, dtype, facts
        )
        self.cfg_scale = {self.family.cfg_scale_field: getattr(self.defaults, self.family.cfg_scale_field)}
        self.uses_cfg = next(iter(self.cfg_scale.values())) > 1
        self.negative = self.encode("") if self.uses_cfg else None

    @classmethod
    def open(cls, folder: ModelFolder, device: str, dtype: str) -> LocalModel:
        """From the --device and --dtype flags' values ("auto" included)."""
        torch_device = resolve_device(device)
        return cls(folder, torch_device, resolve_dtype(dtype, torch_device))

    def encode(self, prompt: str) -> encoder_pb2.PromptEmbedding:
        return self.text.encode(prompt, self.sequence_length)

    def inputs(
        self, prompt: encoder_pb2.PromptEmbedding, seed: int, steps: int, cache: CacheConfig | None = None
    ) -> Any:
        """The family's inputs for a request that sets only its prompt, seed and steps, parsed as served."""
        request = denoiser_pb2.DenoiseRequest(prompt=prompt, num_inference_steps=steps, seed=seed)
        if self.negative is not None:
            request.negative_prompt.CopyFrom(self.negative)
        return self.runner.parse(request, cache or CacheConfig(), self.limits)

    def denoise(self, inputs: Any, nudge: float = 0.0) -> Trajectory:
        """All steps of one request; the trajectory holds the latents and its cache's statistics.

        nudge: the standard deviation of Gaussian noise (seeded by the request's seed) added to the initial
        latents, a change that is no caching at all, to see what a quality measure makes of a tiny one.
        """
        trajectory = self.runner.start(DenoiseJob("local", inputs, inputs.steps))
        if nudge:
            generator = torch.Generator().manual_seed(NUDGE_SEED + inputs.seed)
            noise = torch.randn(trajectory.latents.shape, generator=generator)
            trajectory.latents = trajectory.latents + nudge * noise.to(trajectory.latents)
        for _ in range(inputs.steps):
            (error,) = self.runner.step([trajectory])
            if error is not None:
                raise error
        return trajectory

    @cached_property
    def decoder(self) -> VaeDecoder:
        """The VAE role's decoder, loaded when pixels are first asked for (calibration never needs it)."""
        return self.family.vae_decoder(StageContext("vae", self.folder, self.device, self.dtype, self.limits))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """A batch's uint8 pixels at the folder's default size: images [b, h, w, 3], clips [b, f, h, w, 3]."""
        frames = [self.defaults.num_frames] if self.decoder.video else []
        return np.asarray(self.decoder.decode(latents, self.defaults.height, self.defaults.width, *frames))

    def pixels(self, latents: torch.Tensor) -> np.ndarray:
        """One sample's uint8 pixels at the folder's default size: an image [h, w, 3], a clip [f, h, w, 3]."""
        return self.decode(latents)[0]
