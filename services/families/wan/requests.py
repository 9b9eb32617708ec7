"""A Denoise request read as Wan inputs: one UMT5 embedding (and the negative's), frames, size, CFG."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import RequestLimits, check_frames, check_generation, check_range
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.families.wan.runner import WanInputs
from ditserve.v1 import denoiser_pb2, encoder_pb2

if TYPE_CHECKING:
    from ditserve.services.families.wan.runner import WanRunner


def parse_request(
    request: denoiser_pb2.DenoiseRequest, cache: CacheConfig, runner: WanRunner, limits: RequestLimits
) -> WanInputs:
    """Validated WanInputs; INVALID_ARGUMENT names the field of anything the model cannot take."""
    defaults = runner.facts.defaults
    if not request.HasField("prompt"):
        raise InvalidArgument("prompt", "is missing: send the encoder's embedding")
    if request.HasField("true_cfg_scale"):
        raise InvalidArgument("true_cfg_scale", "Wan has no true CFG: guidance_scale is its (classic) CFG scale")
    prompt = embedding(request.prompt, "prompt", limits, runner.transformer_config)
    guidance = request.guidance_scale if request.HasField("guidance_scale") else defaults.guidance_scale
    inputs = WanInputs(
        prompt=prompt,
        negative=None,
        height=request.height or defaults.height,
        width=request.width or defaults.width,
        num_frames=request.num_frames or defaults.num_frames,
        steps=request.num_inference_steps or defaults.steps,
        guidance_scale=guidance,
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
        true_cfg_scale=1.0,
    )
    check_frames(
        limits,
        height=inputs.height,
        width=inputs.width,
        num_frames=inputs.num_frames,
        temporal_factor=runner.temporal_factor,
    )
    if not (math.isfinite(guidance) and 0.0 <= guidance <= 100.0):
        raise InvalidArgument("guidance_scale", f"{guidance} is outside [0, 100]")
    if guidance <= 1.0:
        return inputs
    if not request.HasField("negative_prompt"):
        raise InvalidArgument("negative_prompt", "is required when guidance_scale > 1 (Wan's CFG)")
    negative = embedding(request.negative_prompt, "negative_prompt", limits, runner.transformer_config)
    if negative.shape != prompt.shape:
        raise InvalidArgument(
            "negative_prompt.prompt_embeds",
            f"shape {list(negative.shape)} differs from the prompt's {list(prompt.shape)}",
        )
    return WanInputs(**{**inputs.__dict__, "negative": negative})


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
