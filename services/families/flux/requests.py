"""A Denoise request read as FLUX inputs: its two embeddings, sizes, steps, guidance and true CFG."""

from __future__ import annotations

import math
from typing import Any

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import RequestLimits, check_generation, check_range
from ditserve.services.common.model import ModelDefaults
from ditserve.services.denoiser.cache.policy import CacheConfig
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
    if not request.HasField("prompt"):
        raise InvalidArgument("prompt", "is missing: send the encoder's embedding")
    if request.num_frames > 1:
        raise InvalidArgument("num_frames", f"{request.num_frames} frames asked of an image model (FLUX)")
    prompt = conditioning(request.prompt, "prompt", limits, transformer_config)
    true_cfg = request.true_cfg_scale if request.HasField("true_cfg_scale") else defaults.true_cfg_scale
    guidance = request.guidance_scale if request.HasField("guidance_scale") else defaults.guidance_scale
    inputs = FluxInputs(
        prompt=prompt,
        negative=None,
        height=request.height or defaults.height,
        width=request.width or defaults.width,
        steps=request.num_inference_steps or defaults.steps,
        guidance_scale=guidance,
        true_cfg_scale=true_cfg,
        seed=request.seed,
        num_images=request.num_images or 1,
        cache=cache,
    )
    check_generation(
        limits,
        height=inputs.height,
        width=inputs.width,
        steps=inputs.steps,
        num_images=inputs.num_images,
        true_cfg_scale=true_cfg,
    )
    if not (math.isfinite(guidance) and 0.0 <= guidance <= 100.0):
        raise InvalidArgument("guidance_scale", f"{guidance} is outside [0, 100]")
    if true_cfg <= 1.0:
        return inputs
    if not request.HasField("negative_prompt"):
        raise InvalidArgument("negative_prompt", "is required when true_cfg_scale > 1")
    negative = conditioning(request.negative_prompt, "negative_prompt", limits, transformer_config)
    if negative.embeds.shape != prompt.embeds.shape:
        raise InvalidArgument(
            "negative_prompt.prompt_embeds",
            f"shape {list(negative.embeds.shape)} differs from the prompt's {list(prompt.embeds.shape)}",
        )
    return FluxInputs(**{**inputs.__dict__, "negative": negative})


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
