"""`ditserve bench optimize`: what --quantize and --compile cost in image quality and buy in time.

The shipped model through FluxPipeline in-process, its transformer changed by the denoiser's own
functions (denoiser/quantize.py, denoiser/compile.py), at the model's defaults (28 steps, true CFG) on
the fidelity prompts. Each variant's images are compared with the eager fp32 ones: PSNR over all pixels
pooled, the largest pixel difference, and the fidelity judge's score, so a quality loss shows as a number
and as wrong shapes. The first batch of a compiled variant pays compilation and is left out of the time.
Random weights say nothing about quality: only a trained model (the shipped one) is measured here.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ditserve.client.config import default_model_dir
from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.bench.common import result_document

VARIANTS = {
    "eager": ("none", False),
    "compile": ("none", True),
    "int8-weight": ("int8-weight", False),
    "int8-weight+compile": ("int8-weight", True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(default_model_dir()), help="a trained model folder (FLUX family)")
    parser.add_argument("--prompts", type=int, default=35, help="fidelity prompts (default: 35)")
    parser.add_argument("--steps", type=int, default=None, help="(default: the model's)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (eager first)"
    )


def prepare(quantize: str, compile: bool) -> Callable[[Any], None]:
    """A FluxPipeline hook applying the denoiser's --quantize, then --compile, to its transformer."""
    import torch

    from ditserve.services.denoiser.compile import compile_blocks
    from ditserve.services.denoiser.quantize import quantize_transformer

    def apply(pipe: Any) -> None:
        quantize_transformer(pipe.transformer, quantize, torch.device("cpu"))
        if compile:
            compile_blocks(pipe.transformer)

    return apply


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.services.tools.bench.image_metrics import psnr
    from ditserve.services.tools.training.evaluate import evaluation_prompts, generate_images, score_report

    folder = ModelFolder(args.model)
    steps = args.steps or folder.defaults.steps
    prompts = evaluation_prompts(args.prompts)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    if names[:1] != ["eager"] or any(name not in VARIANTS for name in names):
        raise SystemExit(f"--variants: eager first, then any of {', '.join(VARIANTS)}")
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for name in names:
        quantize, compile = VARIANTS[name]
        hook = prepare(quantize, compile)
        if compile:  # the first call compiles: time the second
            generate_images(Path(folder.path), prompts, steps=1, prepare=hook)
        started = time.perf_counter()
        images = generate_images(Path(folder.path), prompts, steps=steps, prepare=hook)
        seconds = (time.perf_counter() - started) / len(prompts)
        pixels = np.stack([np.asarray(image) for image in images])
        reference = pixels if reference is None else reference
        report = score_report(images, prompts)
        rows.append(
            {
                "variant": name,
                "quantize": quantize,
                "compile": compile,
                "seconds_per_image": seconds,
                "psnr_db_vs_eager": psnr(pixels, reference),
                "max_abs_pixel_diff_vs_eager": int(np.abs(pixels.astype(int) - reference.astype(int)).max()),
                "fidelity_all": report["all"],
            }
        )
    summary = summarize(rows)
    config = {"steps": steps, "prompts": len(prompts), "dtype": "fp32", "device": "cpu", "variants": names}
    return result_document("optimize", folder.name, config, rows, summary)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat scalars per variant (the bench report's table shows scalar summaries). Quality only: the times
    stay in the rows, since on shared CPU cores they say more about the neighbours than the variant."""
    summary: dict[str, Any] = {}
    for row in rows:
        name = row["variant"]
        if name != "eager":
            summary[f"{name} PSNR dB"] = round(row["psnr_db_vs_eager"], 2)
        summary[f"{name} fidelity"] = round(row["fidelity_all"], 3)
    return summary
