"""ditserve bench fidelity: does the model draw what it is told, and how sharp is its VAE?

Generates one image per prompt of the fixed evaluation list (every colour x shape x background,
seeded jitter; eval/fidelity.py judges them) at the model's native size and default steps through
FluxPipeline in-process, so the figure is the model's and not the transport's; the services are
bit-exact with that pipeline (tests/integration/test_pipeline.py). The VAE's PSNR is measured on
held-out renders no training stream saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ditserve.client.config import default_model_dir
from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.bench.common import result_document
from ditserve.services.tools.eval.grid import sample_grid
from ditserve.services.tools.training.evaluate import evaluation_prompts, generate_images, score_report, vae_quality

TARGETS = {"fidelity_all": 0.90, "vae_psnr_db": 28.0}
GRID_IMAGES = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Prompt fidelity over every colour x shape x background, and the VAE's PSNR."
    parser.add_argument("--model", default=str(default_model_dir()), help="model folder (default: the shipped model)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's default_steps)")
    parser.add_argument("--subset", type=int, help="score this many of the combinations (a seeded choice)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    parser.add_argument("--vae-images", type=int, default=256, help="held-out renders for the PSNR (default: 256)")
    parser.add_argument("--image-dir", type=Path, help="also write every generated image here as PNG")
    parser.add_argument(
        "--grid", type=int, default=GRID_IMAGES, help=f"images in the grid PNG next to --out (default: {GRID_IMAGES})"
    )


def _write_grid(images: list, prompts: list[str], passed: list[bool], count: int, path: Path) -> None:
    """A seeded pick across the list, in list order (so colours read top to bottom)."""
    if count <= 0:
        return
    picked = sorted(np.random.default_rng(0).choice(len(images), size=min(count, len(images)), replace=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid([images[i] for i in picked], [prompts[i] for i in picked], [passed[i] for i in picked]).save(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = ModelFolder(args.model)
    steps = args.steps or folder.defaults.steps
    prompts = evaluation_prompts(args.subset)
    started = time.perf_counter()
    images = generate_images(folder.path, prompts, steps=steps, seed=args.seed)
    seconds_per_image = (time.perf_counter() - started) / len(prompts)
    report = score_report(images, prompts)
    if args.image_dir is not None:
        args.image_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(args.image_dir / f"{index:04d}.png")
    _write_grid(images, prompts, report["passed"], args.grid, Path(args.out).with_suffix(".png"))
    vae = vae_quality(folder.path, n=args.vae_images)
    psnr = vae["vae_psnr_db"]
    summary = {
        "fidelity_all": report["all"],
        "fidelity_color": report["color"],
        "fidelity_shape": report["shape"],
        "fidelity_background": report["background"],
        "vae_psnr_db": psnr,
        "seconds_per_image": seconds_per_image,
        "scorer_on_vae_reconstructions": vae["scorer_on_reconstructions"]["all"],
        "targets": TARGETS,
        "meets_targets": {
            "fidelity_all": report["all"] >= TARGETS["fidelity_all"],
            "vae_psnr_db": psnr >= TARGETS["vae_psnr_db"],
        },
    }
    config = {
        "steps": steps,
        "size": [folder.defaults.height, folder.defaults.width],
        "true_cfg_scale": folder.defaults.true_cfg_scale,
        "prompts": len(prompts),
        "seed": args.seed,
        "vae_images": args.vae_images,
    }
    return result_document("fidelity", folder.name, config, report["failures"], summary)
