"""Quick checks of a trained shapes model folder, in-process on CPU.

generate_images draws with FluxPipeline itself and score_report applies the geometric judge of
eval/fidelity.py, so what is measured is the model, scheduler and all; vae_quality measures the VAE
alone on held-out renders. `ditserve bench fidelity` reports both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline
from PIL import Image
from tqdm import tqdm

from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.eval.fidelity import score_batch, score_image, summarize
from ditserve.services.tools.training.shapes import ShapeSpec, all_combinations, iter_samples

# Training streams are seeded with (seed, phase) tuples, so no int seed reproduces them.
HELD_OUT_SEED = 1_000_003
T = TypeVar("T")


def evaluation_prompts(subset: int | None = None) -> list[str]:
    """Every colour x shape x background once (all_combinations), or a seeded subset in list order."""
    return seeded_subset([spec.prompt for spec in all_combinations()], subset)


def seeded_subset(prompts: list[str], subset: int | None) -> list[str]:
    """All of prompts, or subset of them chosen with seed 0 and kept in list order (a fixed held-out list)."""
    if subset is None or subset >= len(prompts):
        return prompts
    if subset < 1:
        raise ValueError(f"subset must be at least 1, got {subset}")
    chosen = np.random.default_rng(0).choice(len(prompts), size=subset, replace=False)
    return [prompts[i] for i in sorted(chosen)]


def generate_images(
    model_dir: Path,
    prompts: Sequence[str],
    steps: int = 28,
    true_cfg_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 35,
    prepare: Callable[[FluxPipeline], None] | None = None,
) -> list[Image.Image]:
    """One image per prompt at the model's native size, by FluxPipeline itself.

    Image i is drawn from a generator seeded with seed + i, as a served request with that seed would
    be. true_cfg_scale defaults to the folder's ditserve.json; above 1 the negative prompt is "",
    as in training.
    """
    folder = ModelFolder(model_dir)
    defaults = folder.defaults
    cfg = defaults.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
    pipe = FluxPipeline.from_pretrained(folder.path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:  # e.g. bench optimize: quantize or compile the transformer first
        prepare(pipe)

    def draw(chunk: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        return pipe(
            chunk,
            negative_prompt=[""] * len(chunk) if cfg > 1 else None,
            true_cfg_scale=cfg,
            height=defaults.height,
            width=defaults.width,
            num_inference_steps=steps,
            max_sequence_length=defaults.max_sequence_length,
            generator=generators,
        ).images

    return in_batches(prompts, batch_size, seed, draw)


def in_batches(
    prompts: Sequence[str], batch_size: int, seed: int, draw: Callable[[list[str], list[torch.Generator]], list[T]]
) -> list[T]:
    """draw over prompts batch_size at a time, output i from a generator seeded with seed + i (so a
    result does not depend on the batch it was drawn in), with a progress bar."""
    outputs: list[T] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch"):
        chunk = list(prompts[start : start + batch_size])
        outputs += draw(chunk, [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))])
    return outputs


def score_report(
    images: Sequence[Any], prompts: Sequence[str], judge: Callable[[Any, str], dict[str, Any]] = score_image
) -> dict[str, Any]:
    """score_batch's accuracies, each image's verdict ("passed") and the failures: prompt and what was
    seen instead. Each image is judged once, by judge (the video judge's score_video for clips)."""
    scores = [judge(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    result: dict[str, Any] = dict(summarize(scores))
    result["passed"] = [score["all"] for score in scores]
    result["failures"] = [
        {"prompt": prompt, "predicted": score["predicted"]}
        for prompt, score in zip(prompts, scores, strict=True)
        if not score["all"]
    ]
    return result


def vae_quality(model_dir: Path, n: int = 256, seed: int = HELD_OUT_SEED) -> dict[str, Any]:
    """The VAE on n held-out renders at the folder's native size: round-trip PSNR, and the scorer's
    accuracy on the reconstructions (it must judge the model, not the VAE's blur)."""
    vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", local_files_only=True)
    specs, originals, decoded = reconstruct(vae, n, ModelFolder(model_dir).defaults.height, seed)
    images = [Image.fromarray(pixels) for pixels in decoded]
    return {
        "vae_psnr_db": psnr_db(decoded, originals),
        "scorer_on_reconstructions": score_batch(images, [spec.prompt for spec in specs]),
    }


@torch.no_grad()
def reconstruct(
    vae: AutoencoderKL, n: int, size: int, seed: int = HELD_OUT_SEED
) -> tuple[list[ShapeSpec], np.ndarray, np.ndarray]:
    """n held-out renders and their round trips, both uint8 [n, size, size, 3], quantised as
    FluxPipeline's output is. Encodes to the posterior mode: the pipeline never samples a posterior."""
    vae = vae.eval()
    pairs = list(islice(iter_samples(seed, size), n))
    originals = np.stack([np.asarray(image) for _, image in pairs])
    decoded = []
    for start in range(0, n, 32):
        pixels = torch.from_numpy(originals[start : start + 32]).permute(0, 3, 1, 2).float() / 127.5 - 1
        images = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        decoded.append(((images / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return [spec for spec, _ in pairs], originals, np.concatenate(decoded)


def psnr_db(images: np.ndarray, references: np.ndarray) -> float:
    """PSNR of the pooled squared error over all images (a mean of per-image PSNRs would let easy
    images inflate it)."""
    mse = float(((images.astype(np.float64) - references) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf
