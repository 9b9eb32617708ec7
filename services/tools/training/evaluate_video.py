"""Quick checks of a trained moving-shapes (Wan) model folder, in-process on CPU: evaluate.py for clips.

generate_videos draws with WanPipeline itself and the video judge (eval/video_fidelity.py) scores the
clips, so what is measured is the model, scheduler and all; vae_quality measures the VAE alone on
held-out renders. `ditserve bench fidelity` reports both for a folder whose prompt_vocabulary is
"moving-shapes"; `ditserve bench cache` and `ditserve calibrate` take their prompts from
motion_evaluation_prompts and judge a clip with score_video.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from PIL import Image

from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.eval.video_fidelity import score_batch
from ditserve.services.tools.training.evaluate import HELD_OUT_SEED, in_batches, psnr_db, seeded_subset
from ditserve.services.tools.training.motion import ClipSpec, all_clip_combinations, iter_clips

Clip = list[Image.Image]


def motion_evaluation_prompts(subset: int | None = None) -> list[str]:
    """Every colour x shape x background x direction once (all_clip_combinations: 560 prompts), or a
    seeded subset in list order."""
    return seeded_subset([spec.prompt for spec in all_clip_combinations()], subset)


def generate_videos(
    model_dir: Path,
    prompts: Sequence[str],
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> list[Clip]:
    """One clip per prompt at the folder's size, frame count and text length, by WanPipeline itself.

    Clip i is drawn from a generator seeded with seed + i, as a served request with that seed would be.
    steps and guidance_scale default to the folder's ditserve.json; above 1 the negative prompt is "".
    """
    defaults = ModelFolder(model_dir).defaults
    scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    pipe = WanPipeline.from_pretrained(Path(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw(chunk: list[str], generators: list[torch.Generator]) -> list[Clip]:
        return pipe(
            chunk,
            negative_prompt=[""] * len(chunk) if scale > 1 else None,
            guidance_scale=scale,
            height=defaults.height,
            width=defaults.width,
            num_frames=defaults.num_frames,
            num_inference_steps=steps or defaults.steps,
            max_sequence_length=defaults.max_sequence_length,
            generator=generators,
            output_type="pil",
        ).frames

    return in_batches(prompts, batch_size, seed, draw)


def vae_quality(model_dir: Path, n: int = 64, seed: int = HELD_OUT_SEED) -> dict[str, Any]:
    """The VAE on n held-out clips at the folder's size and frame count: round-trip PSNR pooled over
    every frame and per frame index (a causal VAE trained on shorter clips than it decodes shows it in
    the later frames), and the judge's accuracy on the reconstructions (it must judge the model, not
    the VAE's blur)."""
    defaults = ModelFolder(model_dir).defaults
    vae = AutoencoderKLWan.from_pretrained(Path(model_dir) / "vae", local_files_only=True)
    specs, originals, decoded = reconstruct(vae, n, defaults.height, defaults.num_frames, seed)
    clips = [[Image.fromarray(frame) for frame in clip] for clip in decoded]
    return {
        "vae_psnr_db": psnr_db(decoded, originals),
        "vae_psnr_db_by_frame": [psnr_db(decoded[:, i], originals[:, i]) for i in range(decoded.shape[1])],
        "scorer_on_reconstructions": score_batch(clips, [spec.prompt for spec in specs]),
    }


@torch.no_grad()
def reconstruct(
    vae: AutoencoderKLWan, n: int, size: int, num_frames: int, seed: int = HELD_OUT_SEED, batch_size: int = 8
) -> tuple[list[ClipSpec], np.ndarray, np.ndarray]:
    """n held-out clips and their round trips, both uint8 [n, frames, size, size, 3], quantised as
    WanPipeline's output is. Encodes to the posterior mode: the pipeline never samples a posterior."""
    vae = vae.eval()
    pairs = list(islice(iter_clips(seed, size, num_frames), n))
    originals = np.stack([np.stack([np.asarray(frame) for frame in frames]) for _, frames in pairs])
    decoded = []
    for start in range(0, n, batch_size):
        # [clips, frames, h, w, c] -> [clips, c, frames, h, w] in [-1, 1]
        pixels = torch.from_numpy(originals[start : start + batch_size]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        clips = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        decoded.append(((clips / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 4, 1).numpy())
    return [spec for spec, _ in pairs], originals, np.concatenate(decoded)
