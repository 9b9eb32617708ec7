"""FLUX's text encoders (CLIP pooled + T5 sequence) through FluxPipeline's own encode_prompt."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from ditserve.services.common import tensor_codec
from ditserve.services.common.model import ModelFolder
from ditserve.services.families.flux.runner import Conditioning
from ditserve.v1 import encoder_pb2


class FluxTextEncoder:
    def __init__(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        # A text-only FluxPipeline gives us FluxPipeline's own prompt encoding.
        self.pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            transformer=None,
            tokenizer=folder.load("tokenizer"),
            tokenizer_2=folder.load("tokenizer_2"),
            text_encoder=folder.load("text_encoder", device, dtype),
            text_encoder_2=folder.load("text_encoder_2", device, dtype),
        )
        self.max_sequence_length = self.pipe.tokenizer_2.model_max_length

    @torch.inference_mode()
    def conditioning(self, prompt: str, sequence_length: int) -> Conditioning:
        """The T5 sequence and CLIP pooled embedding FluxPipeline.encode_prompt makes."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=sequence_length
        )
        return Conditioning(embeds, pooled)

    def encode(self, prompt: str, sequence_length: int) -> encoder_pb2.PromptEmbedding:
        cond = self.conditioning(prompt, sequence_length)
        return encoder_pb2.PromptEmbedding(
            prompt_embeds=tensor_codec.encode(cond.embeds), pooled_prompt_embeds=tensor_codec.encode(cond.pooled)
        )
