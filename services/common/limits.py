"""Request bounds every stage checks, and the pure validation of generation settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from ditserve.services.common.errors import InvalidArgument

SIZE_MULTIPLE = 16  # VAE factor 8 x 2x2 latent packing


@dataclass(frozen=True)
class RequestLimits:
    """Configurable bounds; each is a flag `--max-...` on every service."""

    max_prompt_chars: int = 2048
    """Longest prompt accepted, in characters."""
    min_size: int = 64
    """Smallest height or width in pixels."""
    max_size: int = 2048
    """Largest height or width in pixels."""
    max_steps: int = 200
    """Most denoising steps per request."""
    max_num_images: int = 8
    """Most images per request."""
    max_sequence_length: int = 512
    """Most text tokens kept by the sequence encoder."""
    max_abs_value: float = 1e6
    """Largest magnitude accepted in incoming float tensors (NaN and Inf are always refused)."""
    max_frames: int = 129
    """Most frames per video (video families)."""
    max_video_pixels: int = 832 * 480 * 81
    """Most height x width x frames per video: bounds activation and decode memory before work starts."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("request limits")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            group.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_range(field: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field, f"{value} is outside [{low}, {high}]")


def check_size(field: str, value: int, limits: RequestLimits) -> None:
    check_range(field, value, limits.min_size, limits.max_size)
    if value % SIZE_MULTIPLE:
        raise InvalidArgument(field, f"{value} is not a multiple of {SIZE_MULTIPLE}")


def check_prompt(field: str, prompt: str, limits: RequestLimits, allow_empty: bool = False) -> None:
    if not allow_empty and not prompt.strip():
        raise InvalidArgument(field, "is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"has {len(prompt)} characters, over the limit of {limits.max_prompt_chars}")


def check_frames(limits: RequestLimits, height: int, width: int, num_frames: int, temporal_factor: int) -> None:
    """A video family's frame count: 1 + a multiple of the VAE's temporal compression, within the limits."""
    check_range("num_frames", num_frames, 1, limits.max_frames)
    if (num_frames - 1) % temporal_factor:
        raise InvalidArgument(
            "num_frames", f"{num_frames} is not {temporal_factor}k+1 (the VAE's temporal compression)"
        )
    if height * width * num_frames > limits.max_video_pixels:
        raise InvalidArgument(
            "num_frames",
            f"{height}x{width} x {num_frames} frames is {height * width * num_frames} pixels, over the limit of"
            f" {limits.max_video_pixels} (--max-video-pixels)",
        )
