"""`ditserve eval fidelity`: score image files (or clips) against their prompts, or check the scorer itself.

A folder given in place of an image is a clip: its PNG frames in name order (what `ditserve bench
fidelity --image-dir` writes for a video model), judged by eval/video_fidelity.py against a
moving-shapes prompt. Scoring needs numpy and PIL only; --validate with --model also loads the model's
VAE (torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.eval import video_fidelity
from ditserve.services.tools.eval.fidelity import score_batch, score_image, summarize
from ditserve.services.tools.prompt_file import VOCABULARY_KEY
from ditserve.services.tools.training.motion import iter_clips
from ditserve.services.tools.training.shapes import iter_samples

# The bar for the scorer: it must judge the model, not the renderer or the VAE's blur.
RENDER_ACCURACY_FLOOR = 0.99
RECONSTRUCTION_ACCURACY_FLOOR = 0.95
CLIP_RECONSTRUCTION_ACCURACY_FLOOR = 0.98  # issue 17's bar for the video judge on VAE round trips
VALIDATION_SEED = 2_000_003  # a stream no training phase or evaluation list uses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Does each image show what its prompt asks for (foreground colour, shape, background; for a clip, "
        "direction of motion too)? A fixed geometric judge, no learned model. Prints one JSON line per image, "
        "then the accuracies."
    )
    parser.add_argument(
        "images", nargs="*", type=Path, help="image files to score, or folders of PNG frames (one clip each)"
    )
    parser.add_argument("--prompt", help="the prompt every image was generated from")
    parser.add_argument("--prompts", type=Path, help="a text file with one prompt per image, in order")
    parser.add_argument(
        "--validate",
        action="store_true",
        help=f"check the scorer instead: on N fresh renders (>= {RENDER_ACCURACY_FLOOR * 100:.0f}%% right) and, "
        f"with --model, on its VAE's reconstructions of them (>= {RECONSTRUCTION_ACCURACY_FLOOR * 100:.0f}%%, "
        f"clips {CLIP_RECONSTRUCTION_ACCURACY_FLOOR * 100:.0f}%%); exits 1 below either",
    )
    parser.add_argument(
        "--model", type=Path, help="model folder whose VAE --validate checks against (a moving-shapes one: clips)"
    )
    parser.add_argument("--video", action="store_true", help="--validate the clip judge without a model")
    parser.add_argument("-n", type=int, default=500, help="renders (clips) --validate uses (default: 500)")


def _prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("ditserve eval fidelity: give exactly one of --prompt and --prompts")
    if args.prompt is not None:
        return [args.prompt] * len(args.images)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if len(prompts) != len(args.images):
        raise SystemExit(f"ditserve eval fidelity: {len(args.images)} images but {len(prompts)} prompts")
    return prompts


def _read(path: Path) -> Image.Image | list[Image.Image]:
    """An image file, or a folder's PNG frames in name order (a clip)."""
    try:
        if not path.is_dir():
            return Image.open(path).convert("RGB")
        frames = [Image.open(frame).convert("RGB") for frame in sorted(path.glob("*.png"))]
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"ditserve eval fidelity: cannot read {path}: {error}") from None
    if not frames:
        raise SystemExit(f"ditserve eval fidelity: {path} is a folder without PNG frames")
    return frames


def _score_files(args: argparse.Namespace) -> int:
    if not args.images:
        raise SystemExit("ditserve eval fidelity: no images given (or pass --validate)")
    prompts = _prompts(args)
    items = [_read(path) for path in args.images]
    clips = {isinstance(item, list) for item in items}
    if len(clips) > 1:
        raise SystemExit("ditserve eval fidelity: give image files or clip folders, not both")
    judge = video_fidelity.score_video if clips == {True} else score_image
    try:
        scores = [judge(item, prompt) for item, prompt in zip(items, prompts, strict=True)]
        for path, prompt, score in zip(args.images, prompts, scores, strict=True):
            print(json.dumps({"image": str(path), "prompt": prompt, **score}))
        print(json.dumps({"summary": summarize(scores)}))
    except ValueError as error:  # a prompt outside the judge's grammar
        raise SystemExit(f"ditserve eval fidelity: {error}") from None
    return 0


def validate(n: int, model: Path | None, video: bool = False) -> dict[str, Any]:
    """The scorer's accuracy on n fresh renders and, given a model, on its VAE's round trips of them:
    clips and the video judge when video is asked for or the model is a moving-shapes one."""
    if model is not None:
        video = video or ModelFolder(model).sidecar.get(VOCABULARY_KEY) == video_fidelity.VOCABULARY
    specs, samples = zip(*islice((iter_clips if video else iter_samples)(VALIDATION_SEED), n), strict=True)
    judge = video_fidelity.score_batch if video else score_batch
    report: dict[str, Any] = {"renders": judge(samples, [spec.prompt for spec in specs])}
    if model is not None:
        if video:
            from ditserve.services.tools.training.evaluate_video import vae_quality
        else:
            from ditserve.services.tools.training.evaluate import vae_quality

        quality = vae_quality(model, n=n, seed=VALIDATION_SEED)
        report["vae_reconstructions"] = quality["scorer_on_reconstructions"]
        report["vae_psnr_db"] = quality["vae_psnr_db"]
    floor = CLIP_RECONSTRUCTION_ACCURACY_FLOOR if video else RECONSTRUCTION_ACCURACY_FLOOR
    report["passed"] = report["renders"]["all"] >= RENDER_ACCURACY_FLOOR and (
        model is None or report["vae_reconstructions"]["all"] >= floor
    )
    return report


def run(args: argparse.Namespace) -> int:
    if not args.validate:
        return _score_files(args)
    report = validate(args.n, args.model, args.video)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report["passed"] else 1
