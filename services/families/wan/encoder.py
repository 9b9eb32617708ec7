"""Wan's text encoder (UMT5) through WanPipeline's own prompt encoding: cleaned, padded with zeros."""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from ditserve.services.common import tensor_codec
from ditserve.services.common.model import ModelFolder
from ditserve.v1 import encoder_pb2


class WanTextEncoder:
    def __init__(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        # A text-only WanPipeline gives us WanPipeline's own prompt encoding.
        self.pipe = WanPipeline(
            tokenizer=folder.load("tokenizer"),
            text_encoder=folder.load("text_encoder", device, dtype),
            vae=None,
            scheduler=None,
            transformer=None,
        )
        self.max_sequence_length = self.pipe.tokenizer.model_max_length

    @torch.inference_mode()
    def embeds(self, prompt: str, sequence_length: int) -> torch.Tensor:
        """[1, sequence_length, text_dim]: the prompt's tokens, then zeros, as WanPipeline.encode_prompt."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=sequence_length, device=self.device
        )
        return embeds

    def encode(self, prompt: str, sequence_length: int) -> encoder_pb2.PromptEmbedding:
        return encoder_pb2.PromptEmbedding(prompt_embeds=tensor_codec.encode(self.embeds(prompt, sequence_length)))
