"""A Denoise request read as FLUX inputs: its two embeddings, sizes, steps, guidance and true CFG."""

from __future__ import annotations

import dataclasses
from typing import Any

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import RequestLimits, check_range
from ditserve.services.common.model import ModelDefaults
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.requests import (
    check_inputs,
    common_inputs,
    negative_conditioning,
    require_prompt,
    setting,
)
from ditserve.services.families.flux.runner import Conditioning, FluxInputs
from ditserve.v1 import denoiser_pb2, encoder_pb2


def parse_request(
    request: denoiser_pb2.DenoiseRequest,
    cache: CacheConfig,
    defaults: ModelDefaults,
    limits: RequestLimits,
    transformer_config: Any,
) -> FluxInputs:
    """Validated FluxInputs; INVALID_ARGUMENT names the field of anything the model cannot take."""
    require_prompt(request)
    if request.num_frames > 1:
        raise InvalidArgument("num_frames", f"{request.num_frames} frames asked of an image model (FLUX)")

    def parse(message: encoder_pb2.PromptEmbedding, field: str) -> Conditioning:
        return conditioning(message, field, limits, transformer_config)

    prompt = parse(request.prompt, "prompt")
    inputs = FluxInputs(
        prompt=prompt,
        negative=None,
        guidance_scale=setting(request, "guidance_scale", defaults.guidance_scale),
        true_cfg_scale=setting(request, "true_cfg_scale", defaults.true_cfg_scale),
        **common_inputs(request, defaults, cache),
    )
    check_inputs(limits, inputs, guidance_scale=inputs.guidance_scale, true_cfg_scale=inputs.true_cfg_scale)
    negative = negative_conditioning(
        request, "true_cfg_scale", inputs.true_cfg_scale, parse, prompt.embeds.shape, lambda c: c.embeds.shape
    )
    return dataclasses.replace(inputs, negative=negative)


def conditioning(message: encoder_pb2.PromptEmbedding, field: str, limits: RequestLimits, config: Any) -> Conditioning:
    """The encoder's T5 sequence and CLIP pooled embedding, checked against the transformer's widths."""
    embeds = tensor_codec.decode_float(message.prompt_embeds, f"{field}.prompt_embeds", limits.max_abs_value)
    pooled = tensor_codec.decode_float(
        message.pooled_prompt_embeds, f"{field}.pooled_prompt_embeds", limits.max_abs_value
    )
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != config.joint_attention_dim:
        raise InvalidArgument(
            f"{field}.prompt_embeds", f"shape {list(embeds.shape)} is not [1, tokens, {config.joint_attention_dim}]"
        )
    check_range(f"{field}.prompt_embeds.shape[1]", embeds.shape[1], 1, limits.max_sequence_length)
    if list(pooled.shape) != [1, config.pooled_projection_dim]:
        raise InvalidArgument(
            f"{field}.pooled_prompt_embeds", f"shape {list(pooled.shape)} is not [1, {config.pooled_projection_dim}]"
        )
    return Conditioning(embeds, pooled)
