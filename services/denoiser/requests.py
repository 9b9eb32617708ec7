"""What every family's request parsing does alike: optional settings, the shared checks, the negative prompt.

A family's requests.py reads its own conditioning and inputs; these helpers keep the checks and their
messages the same for every family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import RequestLimits, check_range, check_size
from ditserve.services.common.model import ModelDefaults
from ditserve.services.denoiser.cache.policy import CacheConfig

Conditioning = TypeVar("Conditioning")


def setting(request: Any, field: str, default: float) -> float:
    """An optional field's value, or the model's default when the request leaves it unset."""
    return getattr(request, field) if request.HasField(field) else default


def request_steps(request: Any, defaults: ModelDefaults) -> int:
    """The request's step count, else the model's: known before parsing, as accepting a cache policy needs it."""
    return request.num_inference_steps or defaults.steps


def common_inputs(request: Any, defaults: ModelDefaults, cache: CacheConfig) -> dict[str, Any]:
    """The settings every family reads alike: size, steps, seed and count (the model's defaults for 0)."""
    return {
        "height": request.height or defaults.height,
        "width": request.width or defaults.width,
        "steps": request_steps(request, defaults),
        "seed": request.seed,
        "num_images": request.num_images or 1,
        "cache": cache,
    }


def require_prompt(request: Any) -> None:
    if not request.HasField("prompt"):
        raise InvalidArgument("prompt", "is missing: send the encoder's embedding")


def check_inputs(limits: RequestLimits, inputs: Any, **scales: float) -> None:
    """Size, steps and count within the limits, each guidance scale finite and within [0, 100]."""
    check_size("height", inputs.height, limits)
    check_size("width", inputs.width, limits)
    check_range("num_inference_steps", inputs.steps, 1, limits.max_steps)
    check_range("num_images", inputs.num_images, 1, limits.max_num_images)
    for field, value in scales.items():
        if not (math.isfinite(value) and 0.0 <= value <= 100.0):
            raise InvalidArgument(field, f"{value} is outside [0, 100]")


def negative_conditioning(
    request: Any,
    cfg_field: str,
    cfg_scale: float,
    parse: Callable[[Any, str], Conditioning],
    prompt_shape: tuple[int, ...],
    shape: Callable[[Conditioning], tuple[int, ...]],
) -> Conditioning | None:
    """The negative prompt's conditioning when classic CFG is on (its scale > 1), of the prompt's shape."""
    if cfg_scale <= 1.0:
        return None
    if not request.HasField("negative_prompt"):
        raise InvalidArgument("negative_prompt", f"is required when {cfg_field} > 1")
    negative = parse(request.negative_prompt, "negative_prompt")
    if tuple(shape(negative)) != tuple(prompt_shape):
        raise InvalidArgument(
            "negative_prompt.prompt_embeds",
            f"shape {list(shape(negative))} differs from the prompt's {list(prompt_shape)}",
        )
    return negative
