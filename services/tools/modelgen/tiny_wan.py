"""A tiny Wan2.1-architecture text-to-video model in diffusers format, built offline and reproducible.

The same classes and layout as Wan-AI/Wan2.1-T2V-1.3B-Diffusers (UMT5 encoder and its T5-style
tokenizer, WanTransformer3DModel with 1x2x2 patches and 3D rotary embeddings, AutoencoderKLWan with 8x
spatial and 4x temporal compression, the flow-matching UniPC scheduler), only shrunk, so the services run
their real Wan code paths on a CPU in tests. The weights are random: videos are noise. latents_mean and
latents_std are not the identity, so a decoder that forgets them differs from WanPipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from ditserve.services.tools.modelgen.tiny_flux import _seeded, _t5_tokenizer, ensure_empty_dir, tiny_t5_config

# Read by the services in place of Wan2.1's defaults (480x832, 81 frames, 50 steps, 512 tokens), which
# would only cost time with a model this small.
DITSERVE_DEFAULTS: dict[str, str | int | float] = {
    "family": "wan",
    "default_height": 64,
    "default_width": 64,
    "default_num_frames": 9,
    "default_fps": 8.0,
    "default_steps": 10,
    "default_guidance_scale": 5.0,
    "default_max_sequence_length": 32,
}
LATENT_CHANNELS = 4

TINY_WAN_TRANSFORMER: dict[str, object] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,  # rotary split 8 (time) + 4 + 4 (height, width)
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 4,
    "rope_max_seq_len": 256,
}


def tiny_wan_transformer(seed: int = 0, **overrides: object) -> WanTransformer3DModel:
    return _seeded(seed, lambda: WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, **overrides}))


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan2.1-T2V's scheduler config at 480p: flow prediction, flow sigmas shifted by 3."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def _vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[-0.3, 0.2, 0.05, -0.1],
        latents_std=[2.0, 1.5, 2.5, 1.8],
    )


def write_tiny_wan(out_dir: Path, seed: int = 0) -> Path:
    """Writes the model into out_dir, which must be absent or empty, and returns out_dir."""
    out_dir = Path(out_dir)
    ensure_empty_dir(out_dir)
    tokenizer = _t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed, lambda: UMT5EncoderModel(tiny_t5_config(UMT5Config, tokenizer))),
        transformer=tiny_wan_transformer(seed),
        vae=_seeded(seed, _vae),
        scheduler=wan_scheduler(),
    )
    return save_wan_folder(out_dir, pipe, DITSERVE_DEFAULTS)


def save_wan_folder(out_dir: Path, pipe: WanPipeline, defaults: dict[str, str | int | float]) -> Path:
    """Saves pipe in the published Wan2.1 layout with defaults as its ditserve.json; returns out_dir."""
    pipe.save_pretrained(out_dir, safe_serialization=True)
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]  # as the published Wan2.1 folders name it
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out_dir / "ditserve.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return out_dir
