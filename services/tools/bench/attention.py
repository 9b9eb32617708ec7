"""`ditserve bench attention`: which attention backend to serve FLUX with, measured on this machine.

For every backend that can run here: the attention kernel alone at FLUX shapes (joint text + image
attention, batch 1), and with --flux-step one whole transformer step with random weights. Backends run
interleaved (A B C A B C ...) so clock and thermal drift hit all of them alike; medians are reported, and
every output is compared with `sdpa_math`, the plain reference. The summary says what `auto` picks here
and how it compares with `torch_sdpa`, i.e. what the choice buys over doing nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ditserve.services.common.device import add_arguments as add_device_arguments
from ditserve.services.common.device import dtype_name, resolve_device, resolve_dtype
from ditserve.services.denoiser.attention import (
    BackendName,
    attention,
    available_backends,
    format_availability,
    resolve_backend,
)
from ditserve.services.families.flux.attention import apply_attention_backend
from ditserve.services.tools.bench.common import median, result_document
from ditserve.services.tools.modelgen.presets import FLUX1_TRANSFORMER

log = logging.getLogger(__name__)

# The transformer configs (FluxTransformer2DModel arguments) of the models whose shapes we measure.
FLUX_DEV = FLUX1_TRANSFORMER
MODELS = {
    "black-forest-labs/FLUX.1-dev": FLUX_DEV,
    "black-forest-labs/FLUX.1-schnell": {**FLUX_DEV, "guidance_embeds": False},
}
TEXT_TOKENS = 512  # FLUX.1-dev's T5 max_sequence_length
MIN_SAMPLE_S = 0.02  # short kernels are repeated within one sample until it lasts this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device_arguments(parser)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", choices=list(MODELS))
    parser.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = 1024x1024); shrink it on CPU")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timed samples per backend")
    parser.add_argument(
        "--flux-step",
        action="store_true",
        help="also time one full transformer step per backend, random weights (CUDA only)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_config = MODELS[args.model]
    heads, head_dim = model_config["num_attention_heads"], model_config["attention_head_dim"]
    if args.flux_step and device.type != "cuda":
        raise SystemExit("--flux-step needs a CUDA device: the full model does not fit a CPU benchmark")

    availability = available_backends(device, dtype, head_dim)
    backends = [name for name, reason in availability.items() if reason is None]
    auto, auto_reason = resolve_backend(BackendName.AUTO.value, device, dtype, head_dim)
    log.info("attention backends on %s %s:\n%s", device, dtype_name(dtype), format_availability(availability))
    log.info("%s", auto_reason)

    generator = torch.Generator(device).manual_seed(0)
    shape = (1, TEXT_TOKENS + args.tokens, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    summary: dict[str, Any] = {"auto_backend": auto.value, "auto_reason": auto_reason}
    with torch.inference_mode():
        rows = _measure("kernel", {name: _kernel_call(q, k, v, name) for name in backends}, args.repeats, device)
        summary.update(_stage_summary("", rows, auto))
        if args.flux_step:
            model = _random_flux(model_config, device, dtype)
            inputs = _flux_inputs(model_config, args.tokens, device, dtype)
            step_rows = _measure(
                "flux_step",
                {name: _step_call(model, inputs, name) for name in backends},
                args.repeats,
                device,
            )
            summary.update(_stage_summary("flux_step_", step_rows, auto))
            rows += step_rows
    summary["unavailable"] = {name.value: reason for name, reason in availability.items() if reason}
    config = {
        "device": str(device),
        "dtype": dtype_name(dtype),
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "image_tokens": args.tokens,
        "text_tokens": TEXT_TOKENS,
        "repeats": args.repeats,
        "flux_step": args.flux_step,
    }
    return result_document(bench="attention", model=args.model, config=config, rows=rows, summary=summary)


def _kernel_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: BackendName) -> Callable[[], Any]:
    return lambda: attention(q, k, v, backend)


def _step_call(model: torch.nn.Module, inputs: dict[str, torch.Tensor], backend: BackendName) -> Callable[[], Any]:
    def step() -> torch.Tensor:
        apply_attention_backend(model, backend)  # a few attribute writes: noise next to a 12B-param step
        return model(**inputs, return_dict=False)[0]

    return step


def _random_flux(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """FluxTransformer2DModel with random weights, built on the GPU in `dtype`: a CPU init takes minutes."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    log.info("built FLUX transformer, %.2fB random params, on %s", model.num_parameters() / 1e9, device)
    return model


def _flux_inputs(
    config: dict[str, Any], image_tokens: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """What FluxPipeline feeds one step: packed latents on a (near-)square grid, T5 and CLIP embeddings."""
    generator = torch.Generator(device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    position = torch.arange(image_tokens, device=device)
    width = math.isqrt(image_tokens)
    img_ids = torch.stack([torch.zeros_like(position), position // width, position % width], dim=-1)
    inputs = {
        "hidden_states": randn(1, image_tokens, config["in_channels"]),
        "encoder_hidden_states": randn(1, TEXT_TOKENS, config["joint_attention_dim"]),
        "pooled_projections": randn(1, config["pooled_projection_dim"]),
        "timestep": torch.ones(1, device=device, dtype=dtype),
        "img_ids": img_ids.to(dtype),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return inputs


def _measure(
    stage: str, calls: dict[BackendName, Callable[[], torch.Tensor]], repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Warm up each backend, then time them interleaved; one row per backend."""
    log.info("%s: warming up %s", stage, ", ".join(name.value for name in calls))
    outputs = {name: call() for name, call in calls.items()}
    per_call = min(_elapsed(call, 1, device) for call in calls.values())
    calls_per_sample = max(1, min(100, round(MIN_SAMPLE_S / per_call)))
    samples: dict[BackendName, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name, call in calls.items():
            samples[name].append(_elapsed(call, calls_per_sample, device) / calls_per_sample)
        log.info("%s: round %d/%d done", stage, repeat + 1, repeats)
    reference = outputs[BackendName.SDPA_MATH].float()
    return [
        {
            "stage": stage,
            "backend": name.value,
            "median_ms": median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "samples_ms": [t * 1e3 for t in times],
            "calls_per_sample": calls_per_sample,
            "max_abs_err_vs_sdpa_math": (outputs[name].float() - reference).abs().max().item(),
        }
        for name, times in samples.items()
    ]


def _elapsed(call: Callable[[], Any], count: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        call()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    """GPU kernels run asynchronously: wait for them, or the clock measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stage_summary(prefix: str, rows: list[dict[str, Any]], auto: BackendName) -> dict[str, Any]:
    by_backend = {row["backend"]: row for row in rows}
    auto_row, torch_row = by_backend[auto.value], by_backend[BackendName.TORCH_SDPA.value]
    return {
        f"{prefix}auto_vs_torch_sdpa_speedup": torch_row["median_ms"] / auto_row["median_ms"],
        f"{prefix}auto_max_abs_err_vs_sdpa_math": auto_row["max_abs_err_vs_sdpa_math"],
        f"{prefix}auto_median_ms": auto_row["median_ms"],
        f"{prefix}fastest_backend": min(rows, key=lambda row: row["median_ms"])["backend"],
    }
