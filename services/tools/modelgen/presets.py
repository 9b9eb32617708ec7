"""`ditserve make-model --preset NAME --random-weights DIR`: published architectures as configs only.

A preset folder is a diffusers-layout model folder with every component's config.json (the published
FLUX.1-dev / FLUX.1-schnell / Wan2.1-T2V-1.3B facts: transformer, VAE and the full-size text encoders,
CLIP-L + T5-XXL or UMT5-XXL) and no weights: its ditserve.json says `"random_weights": true`, and each
service builds its components from the configs with seeded random weights, directly on its device in
its dtype (common/model.py random_component), at load time. Writing 30+ GB of random numbers to disk, and
reading them back, would only cost time. The tokenizers are the tiny model's offline ones (word-level,
ids below every full-size vocabulary): token ids still index the full embedding tables, and tokenizing is
no part of what these folders time. Random weights say nothing about image quality; Info says so.

The tiny presets are the same folders at make-tiny-model's sizes, so the suite runs this path on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLWan, FluxTransformer2DModel, WanTransformer3DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from ditserve.services.tools.modelgen import tiny_flux, tiny_wan

# black-forest-labs/FLUX.1-dev transformer/config.json (FLUX.1-schnell: guidance_embeds false).
FLUX1_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# FLUX.1 vae/config.json: 16 latent channels, no quant convs, scale 0.3611, shift 0.1159.
FLUX1_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# openai/clip-vit-large-patch14's text tower, as FLUX.1's text_encoder/config.json has it.
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# google/t5-v1_1-xxl's encoder (FLUX.1 text_encoder_2) and google/umt5-xxl's (Wan2.1 text_encoder).
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
UMT5_XXL: dict[str, Any] = {**T5_XXL, "vocab_size": 256384}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; its VAE is AutoencoderKLWan's defaults.
WAN21_T2V_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

Builders = dict[str, Callable[[], Any]]


def _flux(transformer: dict[str, Any], defaults: dict[str, Any]) -> tuple[str, Builders, dict[str, Any]]:
    clip_tokenizer, t5_tokenizer = tiny_flux._clip_tokenizer(), tiny_flux._t5_tokenizer()
    ids = {key: getattr(clip_tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    t5_ids = {"pad_token_id": t5_tokenizer.pad_token_id, "eos_token_id": t5_tokenizer.eos_token_id}
    return (
        "FluxPipeline",
        {
            "transformer": lambda: FluxTransformer2DModel(**transformer),
            "vae": lambda: AutoencoderKL(**FLUX1_VAE),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(**T5_XXL, **t5_ids, decoder_start_token_id=0)),
            "tokenizer": lambda: clip_tokenizer,
            "tokenizer_2": lambda: t5_tokenizer,
            "scheduler": tiny_flux.flux_scheduler,
        },
        {"family": "flux", **defaults},
    )


def _tiny_flux() -> tuple[str, Builders, dict[str, Any]]:
    text = tiny_flux.text_components(0)
    return (
        "FluxPipeline",
        {
            "transformer": lambda: FluxTransformer2DModel(**tiny_flux.TINY_TRANSFORMER),
            "vae": tiny_flux._vae,
            **{name: (lambda module=module: module) for name, module in text.items()},
            "scheduler": tiny_flux.flux_scheduler,
        },
        dict(tiny_flux.DITSERVE_DEFAULTS),
    )


def _wan(
    transformer: Callable[[], Any], vae: Callable[[], Any], encoder: dict[str, Any], defaults: dict[str, Any]
) -> tuple[str, Builders, dict[str, Any]]:
    tokenizer = tiny_flux._t5_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return (
        "WanPipeline",
        {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**encoder, **ids, decoder_start_token_id=0)),
            "tokenizer": lambda: tokenizer,
            "scheduler": tiny_wan.wan_scheduler,
        },
        {"family": "wan", **defaults},
    )


TINY_UMT5 = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "feed_forward_proj": "gated-gelu"}

PRESETS: dict[str, Callable[[], tuple[str, Builders, dict[str, Any]]]] = {
    "flux.1-dev": lambda: _flux(FLUX1_TRANSFORMER, {}),
    # schnell: 4 steps, no guidance embedding, 256 text tokens (FluxPipeline's advice for it).
    "flux.1-schnell": lambda: _flux(
        {**FLUX1_TRANSFORMER, "guidance_embeds": False},
        {"default_steps": 4, "default_guidance_scale": 0.0, "default_max_sequence_length": 256},
    ),
    "wan2.1-t2v-1.3b": lambda: _wan(lambda: WanTransformer3DModel(**WAN21_T2V_1_3B), AutoencoderKLWan, UMT5_XXL, {}),
    "tiny-flux": _tiny_flux,
    "tiny-wan": lambda: _wan(
        tiny_wan.tiny_wan_transformer,
        tiny_wan._vae,
        {**TINY_UMT5, "vocab_size": len(tiny_flux._t5_tokenizer())},
        {key: value for key, value in tiny_wan.DITSERVE_DEFAULTS.items() if key != "family"},
    ),
}


def write_preset(name: str, out_dir: Path) -> Path:
    """Writes preset `name` as configs plus tokenizers into out_dir (absent or empty); no weights."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    tiny_flux.ensure_empty_dir(out_dir)
    pipeline, builders, defaults = PRESETS[name]()
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": _diffusers_version()}
    for component, build in builders.items():
        directory = out_dir / component
        if component.startswith(("tokenizer", "scheduler")):
            obj = build()
        else:
            with torch.device("meta"):  # configs only: no memory, no init
                obj = build()
        if hasattr(obj, "save_config"):  # diffusers models and schedulers
            obj.save_config(directory)
        elif isinstance(obj, torch.nn.Module):  # transformers models
            obj.config.save_pretrained(directory)
        else:  # tokenizers
            obj.save_pretrained(directory)
            if component == "tokenizer" and pipeline == "FluxPipeline":
                tiny_flux._write_clip_vocab_files(obj, directory)
        library = type(obj).__module__.split(".")[0]
        class_name = type(obj).__name__
        if class_name in ("T5Tokenizer", "T5TokenizerFast"):
            class_name = "T5TokenizerFast"  # as the published FLUX.1 and Wan2.1 folders name it
        index[component] = [library, class_name]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    sidecar = {**defaults, "random_weights": True, "preset": name}
    (out_dir / "ditserve.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return out_dir


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
