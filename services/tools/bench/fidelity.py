"""ditserve bench fidelity: does the model draw what it is told, and how sharp is its VAE?

Generates one image per prompt of the fixed evaluation list (every colour x shape x background,
seeded jitter; eval/fidelity.py judges them) at the model's native size and default steps through
FluxPipeline in-process, so the figure is the model's and not the transport's; the services are
bit-exact with that pipeline (tests/integration/test_pipeline.py). The VAE's PSNR is measured on
held-out renders no training stream saw.

A folder whose ditserve.json names `"prompt_vocabulary": "moving-shapes"` (a Wan video model) is measured
the same way on clips instead (bench/fidelity_video.py): every colour x shape x background x direction
through WanPipeline, judged by eval/video_fidelity.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ditserve.client.config import add_model_argument
from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.bench.common import result_document
from ditserve.services.tools.eval.grid import sample_grid
from ditserve.services.tools.eval.video_fidelity import VOCABULARY
from ditserve.services.tools.prompt_file import VOCABULARY_KEY
from ditserve.services.tools.training.evaluate import evaluation_prompts, generate_images, score_report, vae_quality

TARGETS = {"fidelity_all": 0.90, "vae_psnr_db": 28.0}
GRID_IMAGES = 30
GRID_CLIPS = 12  # one per row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Prompt fidelity over every colour x shape x background (x direction, for a moving-shapes video model),"
        " and the VAE's PSNR."
    )
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's default_steps)")
    parser.add_argument("--subset", type=int, help="score this many of the combinations (a seeded choice)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    parser.add_argument(
        "--vae-images", type=int, help="held-out renders for the PSNR (default: 256 images, or 64 clips)"
    )
    parser.add_argument(
        "--image-dir", type=Path, help="also write every generated image here as PNG (a clip: a folder of frames)"
    )
    parser.add_argument(
        "--grid", type=int, help=f"images (clips) in the grid PNG next to --out (default: {GRID_IMAGES} ({GRID_CLIPS}))"
    )


def write_grid(
    cells: list[Image.Image], prompts: list[str], passed: list[bool], count: int, path: Path, columns: int = 6
) -> None:
    """A seeded pick across the list, in list order (so colours read top to bottom)."""
    if count <= 0:
        return
    picked = sorted(np.random.default_rng(0).choice(len(cells), size=min(count, len(cells)), replace=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid([cells[i] for i in picked], [prompts[i] for i in picked], [passed[i] for i in picked], columns)
    grid.save(path)


def fidelity_summary(
    report: dict[str, Any], vae: dict[str, Any], timing: dict[str, float], targets: dict[str, float]
) -> dict[str, Any]:
    """fidelity_all and fidelity_<attribute> from a score_report, the VAE's figures, the timing, and
    whether each target is met."""
    attributes = [name for name in report if name not in ("all", "n", "passed", "failures")]
    summary: dict[str, Any] = {f"fidelity_{name}": report[name] for name in ("all", *attributes)}
    summary["vae_psnr_db"] = vae["vae_psnr_db"]
    summary.update(timing)
    judged = vae["scorer_on_reconstructions"]
    summary["scorer_on_vae_reconstructions"] = judged["all"]
    # which attribute the VAE loses caps that attribute's fidelity, whatever the transformer draws
    summary["scorer_on_vae_reconstructions_by_attribute"] = {name: judged[name] for name in attributes}
    summary["targets"] = targets
    summary["meets_targets"] = {name: summary[name] >= target for name, target in targets.items()}
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = ModelFolder(args.model)
    if folder.sidecar.get(VOCABULARY_KEY) == VOCABULARY:
        from ditserve.services.tools.bench.fidelity_video import run_video

        return run_video(args, folder)
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
    count = GRID_IMAGES if args.grid is None else args.grid
    write_grid(images, prompts, report["passed"], count, Path(args.out).with_suffix(".png"))
    vae = vae_quality(folder.path, n=args.vae_images or 256)
    summary = fidelity_summary(report, vae, {"seconds_per_image": seconds_per_image}, TARGETS)
    config = {
        "steps": steps,
        "size": [folder.defaults.height, folder.defaults.width],
        "true_cfg_scale": folder.defaults.true_cfg_scale,
        "prompts": len(prompts),
        "seed": args.seed,
        "vae_images": args.vae_images or 256,
    }
    return result_document("fidelity", folder.name, config, report["failures"], summary)
