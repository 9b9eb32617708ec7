"""train_wan_model at toy step counts writes a folder WanPipeline loads and runs at the sidecar's defaults,
with the latent normalisation it measured; the resumable loop itself is tested in test_training.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanPipeline
from factories import forbid_latent_pool, weight_digests

from ditserve.services.common.model import ModelFolder
from ditserve.services.families import family_name
from ditserve.services.tools.training import train_wan

pytestmark = pytest.mark.slow  # a minute and more of set-up (two compiled training phases): make test-slow

TOY: dict[str, Any] = {
    "vae_steps": 1,
    "vae_clip_steps": 1,
    "transformer_steps": 2,
    "vae_decoder_steps": 1,
    "vae_batch_size": 1,
    "transformer_batch_size": 2,
    "latent_pool_size": 4,
    "checkpoint_every_s": 0.0,
    "progress": False,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wan")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_wan, "LATENT_STATS_SAMPLES", 4)
        return train_wan.train_wan_model(root / "model", checkpoint_dir=root / "checkpoints", **TOY)


def test_the_folder_is_a_wan_model_with_the_video_defaults(trained: Path) -> None:
    assert json.loads((trained / "ditserve.json").read_text()) == train_wan.DITSERVE_DEFAULTS
    folder = ModelFolder(trained)
    assert family_name(folder) == "wan"
    assert (folder.defaults.num_frames, folder.defaults.steps) == (9, train_wan.DEFAULT_STEPS)
    assert not [path for path in trained.rglob("*") if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}]


def test_output_loads_with_wan_pipeline_and_runs_at_the_sidecar_defaults(trained: Path) -> None:
    pipe = WanPipeline.from_pretrained(trained, local_files_only=True)
    last_vae_phase = trained.with_name("checkpoints") / f"{train_wan.VAE_CLIP_PHASE.name}.pt"
    mean, std = torch.load(last_vae_phase, weights_only=True)["latent_stats"]
    # The latent normalisation is measured per channel, not Wan2.1's published one.
    assert (pipe.vae.config.latents_mean, pipe.vae.config.latents_std) == (mean, std)
    assert len(mean) == train_wan.VAE_CONFIG["z_dim"] and min(std) > 0
    # Every prompt word, the motion words included, is one token.
    prompt = "an orange triangle moving right on a white background"
    assert len(pipe.tokenizer.tokenize(prompt)) == len(prompt.split())
    defaults = ModelFolder(trained).defaults
    frames = pipe(
        prompt,
        negative_prompt="",
        height=defaults.height,
        width=defaults.width,
        num_frames=defaults.num_frames,
        num_inference_steps=1,
        guidance_scale=defaults.guidance_scale,
        max_sequence_length=defaults.max_sequence_length,
        output_type="np",
    ).frames
    assert frames.shape == (1, defaults.num_frames, defaults.height, defaults.width, 3)


def test_the_decoder_phase_tunes_the_decoder_and_leaves_the_encoder(trained: Path) -> None:
    """The transformer learned on the clip phase's encoder: its latents must decode, not change."""
    exported = WanPipeline.from_pretrained(trained, local_files_only=True).vae.state_dict()
    clip_phase = torch.load(trained.with_name("checkpoints") / f"{train_wan.VAE_CLIP_PHASE.name}.pt", weights_only=True)
    before = clip_phase["model"]
    encoder = [name for name in before if name.startswith(("encoder.", "quant_conv."))]
    decoder = [name for name in before if name.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    assert all(torch.equal(exported[name], before[name]) for name in encoder)
    assert not all(torch.equal(exported[name], before[name]) for name in decoder)


def test_a_run_resumed_after_its_transformer_phase_skips_the_latent_pool(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid_latent_pool(monkeypatch, train_wan._WanJob)
    again = train_wan.train_wan_model(tmp_path / "model", checkpoint_dir=trained.with_name("checkpoints"), **TOY)
    assert weight_digests(again) == weight_digests(trained)
