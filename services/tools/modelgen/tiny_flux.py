"""A tiny FLUX.1-architecture model in diffusers format, built offline and bit-for-bit reproducible.

Every component has FLUX.1's classes and wiring (CLIP pooled + T5 sequence conditioning, an 8x VAE
whose latents are packed 2x2, the dynamic-shift flow-matching scheduler), only shrunk, so the
services run their real code paths on a CPU in tests. The weights are random: images are noise.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

# Colours, shapes, positions and common words, as in demo and test prompts; each is one token in both
# tokenizers. Other text still tokenizes, only into pieces (CLIP falls back to bytes, T5 to the
# characters below and <unk>).
_WORD_TEXT = """
    red orange yellow green blue purple pink brown black white gray grey gold silver
    circle square triangle rectangle star heart line dot ring cross diamond oval
    left right top bottom center middle above below behind front inside outside near
    a an the of on in at to and or with without is are small large big tiny bright dark
    background foreground picture photo image painting drawing sky sea tree house cat dog sun
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"  # also CLIP's pad and unk, as in openai/clip-vit-large-patch14
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# Read by the services in place of FLUX.1-dev's defaults (1024 px, 28 steps, 512 tokens), which
# would only cost time with a model this small.
DITSERVE_DEFAULTS: dict[str, str | int | float] = {
    "family": "flux",
    "default_height": 64,
    "default_width": 64,
    "default_steps": 20,
    "default_max_sequence_length": 64,
    "default_guidance_scale": 3.5,
}

_Module = TypeVar("_Module", bound=torch.nn.Module)


def write_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Writes the model into out_dir, which must be absent or empty, and returns out_dir."""
    components = {"vae": _seeded(seed, _vae), "transformer": tiny_transformer(seed)}
    return save_flux_folder(out_dir, {**components, **text_components(seed)}, DITSERVE_DEFAULTS)


def ensure_empty_dir(out_dir: Path) -> None:
    """Refuses a non-empty out_dir, before any work is spent on what would be written there.

    Leftovers of another model (a stray .bin, a bigger transformer) would make a folder that loads
    as something other than what was written.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; give a new path")


def text_components(seed: int) -> dict[str, torch.nn.Module | CLIPTokenizer | T5Tokenizer]:
    """FLUX's two tokenizers and two text encoders, the encoders seeded; shared by every model written."""
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    return {
        "tokenizer": clip_tokenizer,
        "text_encoder": _seeded(seed, lambda: _clip_text_encoder(clip_tokenizer)),
        "tokenizer_2": t5_tokenizer,
        "text_encoder_2": _seeded(seed, lambda: _t5_encoder(t5_tokenizer)),
    }


def save_flux_folder(out_dir: Path, components: dict[str, object], defaults: dict[str, str | int | float]) -> Path:
    """Saves a FluxPipeline of components and FLUX's scheduler, loadable offline by transformers 4 and 5.

    out_dir must be absent or empty (see ensure_empty_dir); defaults become the ditserve.json sidecar.
    """
    out_dir = Path(out_dir)
    ensure_empty_dir(out_dir)
    pipe = FluxPipeline(scheduler=flux_scheduler(), **components)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_clip_vocab_files(pipe.tokenizer, out_dir / "tokenizer")
    _name_t5_tokenizer_fast(out_dir / "model_index.json")
    (out_dir / "ditserve.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return out_dir


def _seeded(seed: int, build: Callable[[], _Module]) -> _Module:
    """Reseeds before each module so its weights depend on seed alone, not on what was built before."""
    torch.manual_seed(seed)
    return build()


# The tiny model's transformer: 1 double + 2 single blocks, 2 heads x 16; in_channels 16 = 4 latent
# channels x the 2x2 packing; the rope axes (4, 6, 6) sum to the head dim.
TINY_TRANSFORMER: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_transformer(seed: int = 0, **overrides: object) -> FluxTransformer2DModel:
    """The tiny model's transformer alone, seeded; `overrides` change its config (more blocks or heads, a
    guidance embedding). A new head dim without rope axes gets FLUX's split of it, (4, 6, 6) at 16."""
    config = {**TINY_TRANSFORMER, **overrides}
    if "attention_head_dim" in overrides and "axes_dims_rope" not in overrides:
        head_dim = int(overrides["attention_head_dim"])  # type: ignore[call-overload]
        config["axes_dims_rope"] = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return _seeded(seed, lambda: FluxTransformer2DModel(**config))


def _vae() -> AutoencoderKL:
    """Four blocks, so the pipeline derives FLUX's vae_scale_factor of 8 from the config.

    scaling_factor and shift_factor are FLUX.1's own, not the identity, so a service that forgets
    to apply them decodes differently from diffusers' pipeline and a comparison catches it.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config, so timesteps shift with image size exactly as for the real model."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    # eos_token_id must be the tokenizer's: the pooled output FLUX uses is the state at the first eos.
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_t5_config(config_class: type[T5Config], tokenizer: T5Tokenizer) -> T5Config:
    """A 2-layer, 32-wide T5-style encoder config for `tokenizer` (T5 for FLUX, UMT5 for Wan); gated-gelu
    as in T5 v1.1, the family of both FLUX's T5-XXL and Wan's UMT5-XXL."""
    return config_class(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(tiny_t5_config(T5Config, tokenizer))


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE laid out like CLIP's: every byte with and without </w>, then merges, then bos, eos.

    eos gets the highest id, as in CLIP, which the argmax pooling of old CLIP configs relies on.
    """
    merges = _bpe_merges(WORDS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [
        *alphabet,
        *(char + "</w>" for char in alphabet),
        *("".join(pair) for pair in merges),
        CLIP_BOS,
        CLIP_EOS,
    ]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def _bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE training run to the end, so each word becomes one token, with ties broken alphabetically.

    Not the tokenizers library's BpeTrainer: it breaks ties in hash order, which differs from one
    process to the next, and so would the vocab and every token id.
    """
    segmentations = [[*word[:-1], word[-1] + "</w>"] for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while counts := Counter(pair for pieces in segmentations for pair in itertools.pairwise(pieces)):
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmentations = [_apply_merge(pieces, best) for pieces in segmentations]
    return merges


def _apply_merge(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    """Joins each occurrence of pair, left to right and without overlap, as BPE encoding does."""
    merged: list[str] = []
    index = 0
    while index < len(pieces):
        if tuple(pieces[index : index + 2]) == pair:
            merged.append(pieces[index] + pieces[index + 1])
            index += 2
        else:
            merged.append(pieces[index])
            index += 1
    return merged


def _t5_tokenizer(words: tuple[str, ...] = WORDS) -> T5Tokenizer:
    """A Unigram vocab in T5's layout (<pad> 0, </s> 1, <unk> 2); whole words outscore their letters."""
    vocab = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -2.0),
        *((char, -10.0) for char in T5_CHARACTERS),
        *(("▁" + word, -5.0) for word in words),
    ]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _write_clip_vocab_files(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """Adds vocab.json and merges.txt, the files transformers 4's slow CLIPTokenizer loads."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
    merges = "".join(f"{first} {second}\n" for first, second in model["merges"])
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


def _name_t5_tokenizer_fast(model_index: Path) -> None:
    """Names tokenizer_2 T5TokenizerFast as FLUX.1 does; transformers 4's T5Tokenizer needs spiece.model."""
    index = json.loads(model_index.read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
