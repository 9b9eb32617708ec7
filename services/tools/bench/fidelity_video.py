"""ditserve bench fidelity on a moving-shapes video model: bench/fidelity.py's measure, for clips.

Generates one clip per prompt of the fixed evaluation list (every colour x shape x background x
direction, seeded jitter) at the folder's size, frame count and default steps through WanPipeline
in-process and judges each with eval/video_fidelity.py (colour, shape, background, direction); the VAE's
PSNR is pooled over every frame of held-out clips no training stream saw, and the judge is also run on
those reconstructions (it must judge the model, not the VAE).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.bench.common import result_document
from ditserve.services.tools.bench.fidelity import GRID_CLIPS, fidelity_summary, write_grid
from ditserve.services.tools.eval.grid import clip_strip
from ditserve.services.tools.eval.video_fidelity import score_video
from ditserve.services.tools.training.evaluate import score_report
from ditserve.services.tools.training.evaluate_video import (
    Clip,
    generate_videos,
    motion_evaluation_prompts,
    vae_quality,
)

# The bar: most clips right, motion right in nine of ten, a VAE sharp enough for the judge.
TARGETS = {"fidelity_all": 0.85, "fidelity_direction": 0.90, "vae_psnr_db": 28.0}
VAE_CLIPS = 64


def _write_clips(clips: list[Clip], folder: Path) -> None:
    """Clip i as folder/<i>/<frame>.png, lossless: `ditserve eval fidelity` reads such a folder as a clip."""
    for index, clip in enumerate(clips):
        (folder / f"{index:04d}").mkdir(parents=True, exist_ok=True)
        for frame_index, frame in enumerate(clip):
            frame.save(folder / f"{index:04d}" / f"{frame_index:02d}.png")


def run_video(args: argparse.Namespace, folder: ModelFolder) -> dict[str, Any]:
    defaults = folder.defaults
    steps = args.steps or defaults.steps
    prompts = motion_evaluation_prompts(args.subset)
    started = time.perf_counter()
    clips = generate_videos(folder.path, prompts, steps=steps, seed=args.seed)
    seconds_per_video = (time.perf_counter() - started) / len(prompts)
    report = score_report(clips, prompts, judge=score_video)
    if args.image_dir is not None:
        _write_clips(clips, args.image_dir)
    count = GRID_CLIPS if args.grid is None else args.grid
    strips = [clip_strip(clip) for clip in clips]
    write_grid(strips, prompts, report["passed"], count, Path(args.out).with_suffix(".png"), columns=1)
    vae_clips = args.vae_images or VAE_CLIPS
    vae = vae_quality(folder.path, n=vae_clips)
    summary = fidelity_summary(report, vae, {"seconds_per_video": seconds_per_video}, TARGETS)
    summary["vae_psnr_db_by_frame"] = vae["vae_psnr_db_by_frame"]
    config = {
        "steps": steps,
        "size": [defaults.height, defaults.width],
        "num_frames": defaults.num_frames,
        "guidance_scale": defaults.guidance_scale,
        "prompts": len(prompts),
        "seed": args.seed,
        "vae_clips": vae_clips,
    }
    return result_document("fidelity", folder.name, config, report["failures"], summary)
