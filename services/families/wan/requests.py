"""A Denoise request read as Wan inputs: one UMT5 embedding (and the negative's), frames, size, CFG."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import RequestLimits, check_frames, check_range
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.requests import (
    check_inputs,
    common_inputs,
    negative_conditioning,
    require_prompt,
    setting,
)
from ditserve.services.families.wan.runner import WanInputs
from ditserve.v1 import denoiser_pb2, encoder_pb2

if TYPE_CHECKING:
    from ditserve.services.families.wan.runner import WanRunner


def parse_request(
    request: denoiser_pb2.DenoiseRequest, cache: CacheConfig, runner: WanRunner, limits: RequestLimits
) -> WanInputs:
    """Validated WanInputs; INVALID_ARGUMENT names the field of anything the model cannot take."""
    defaults = runner.facts.defaults
    require_prompt(request)
    if request.HasField("true_cfg_scale"):
        raise InvalidArgument("true_cfg_scale", "Wan has no true CFG: guidance_scale is its (classic) CFG scale")

    def parse(message: encoder_pb2.PromptEmbedding, field: str) -> torch.Tensor:
        return embedding(message, field, limits, runner.transformer_config)

    prompt = parse(request.prompt, "prompt")
    inputs = WanInputs(
        prompt=prompt,
        negative=None,
        num_frames=request.num_frames or defaults.num_frames,
        guidance_scale=setting(request, "guidance_scale", defaults.guidance_scale),
        **common_inputs(request, defaults, cache),
    )
    check_inputs(limits, inputs, guidance_scale=inputs.guidance_scale)
    check_frames(limits, inputs.height, inputs.width, inputs.num_frames, runner.temporal_factor)
    negative = negative_conditioning(request, "guidance_scale", inputs.guidance_scale, parse, prompt.shape, _shape)
    return dataclasses.replace(inputs, negative=negative)


def _shape(embeds: torch.Tensor) -> tuple[int, ...]:
    return tuple(embeds.shape)


def embedding(message: encoder_pb2.PromptEmbedding, field: str, limits: RequestLimits, config: Any) -> torch.Tensor:
    """The encoder's UMT5 sequence [1, tokens, text_dim]; Wan takes no pooled embedding."""
    if message.HasField("pooled_prompt_embeds") and message.pooled_prompt_embeds.raw_data:
        raise InvalidArgument(f"{field}.pooled_prompt_embeds", "Wan takes no pooled embedding: leave it unset")
    embeds = tensor_codec.decode_float(message.prompt_embeds, f"{field}.prompt_embeds", limits.max_abs_value)
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != config.text_dim:
        raise InvalidArgument(
            f"{field}.prompt_embeds", f"shape {list(embeds.shape)} is not [1, tokens, {config.text_dim}]"
        )
    check_range(f"{field}.prompt_embeds.shape[1]", embeds.shape[1], 1, limits.max_sequence_length)
    return embeds
