"""write_tiny_flux: reproducible files that diffusers' FluxPipeline loads offline and runs end to end."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from ditserve.services.tools.modelgen.tiny_flux import DITSERVE_DEFAULTS, WORDS, write_tiny_flux

PROMPT = "a red circle on a blue background"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WEIGHT_FILES = {
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
}


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _refuse_connect(*args: object, **kwargs: object) -> None:
    raise AssertionError("the tiny model must load without network access")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> FluxPipeline:
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, so the socket patch is what enforces it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", _refuse_connect)
        return FluxPipeline.from_pretrained(model_dir)


def _generate(pipe: FluxPipeline, prompt: str = PROMPT, **kwargs: object) -> np.ndarray:
    image = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=64,
        output_type="pil",
        **kwargs,
    ).images[0]
    assert image.size == (64, 64)
    return np.asarray(image, dtype=np.int16)


def test_another_process_writes_identical_files(model_dir: Path, tmp_path: Path) -> None:
    # A fresh process: hash-seeded tie-breaking or RNG state left by earlier tests would show up here.
    again = tmp_path / "again"
    code = f"from {write_tiny_flux.__module__} import write_tiny_flux; write_tiny_flux({str(again)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

    first, second = _digests(model_dir), _digests(again)
    assert {name: first[name] for name in WEIGHT_FILES} == {name: second[name] for name in WEIGHT_FILES}
    assert first == second


def test_seed_changes_every_weight_file_and_no_tokenizer_file(model_dir: Path, tmp_path: Path) -> None:
    other = write_tiny_flux(tmp_path, seed=1)  # an existing empty directory is accepted

    first, second = _digests(model_dir), _digests(other)
    assert all(first[name] != second[name] for name in WEIGHT_FILES)
    assert {name: digest for name, digest in first.items() if name not in WEIGHT_FILES} == {
        name: digest for name, digest in second.items() if name not in WEIGHT_FILES
    }


def test_layout_is_small_safetensors_only_with_flux_classes(model_dir: Path) -> None:
    files = [path for path in model_dir.rglob("*") if path.is_file()]
    assert {path.relative_to(model_dir).as_posix() for path in files if path.suffix == ".safetensors"} == (WEIGHT_FILES)
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert sum(path.stat().st_size for path in files) < 5_000_000

    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {name: tuple(pair) for name, pair in index.items() if isinstance(pair, list) and pair[0]} == {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    }
    assert json.loads((model_dir / "ditserve.json").read_text()) == DITSERVE_DEFAULTS
    assert DITSERVE_DEFAULTS["family"] == "flux"


def test_clip_tokenizer_keeps_words_whole_and_loads_from_vocab_and_merges(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    assert tokenizer.model_max_length == 77
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == tokenizer.pad_token_id
    for word in WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == [BOS, f"{word}</w>", EOS]
    config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    assert (config["eos_token_id"], config["vocab_size"]) == (tokenizer.eos_token_id, len(tokenizer))

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / "tokenizer" / name).read_bytes())
    text = f"{PROMPT}, with Zebras: 42!"
    assert CLIPTokenizer.from_pretrained(tmp_path)(text).input_ids == tokenizer(text).input_ids


def test_t5_tokenizer_has_t5_special_ids(model_dir: Path) -> None:
    tokenizer = T5TokenizerFast.from_pretrained(model_dir / "tokenizer_2")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    for word in WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == [f"\u2581{word}", "</s>"]
    ids = tokenizer(PROMPT, padding="max_length", max_length=10).input_ids
    assert ids[7:] == [1, 0, 0] and 2 not in ids
    config = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)


def test_pipeline_makes_a_varied_image_that_follows_prompt_and_seed(pipe: FluxPipeline) -> None:
    assert pipe.vae_scale_factor == 8
    image = _generate(pipe)
    assert image.std() > 5, "a constant image means some stage's output is degenerate"
    assert np.array_equal(image, _generate(pipe))
    assert not np.array_equal(image, _generate(pipe, "a green square"))


def test_true_cfg_with_empty_negative_prompt_changes_the_image(pipe: FluxPipeline) -> None:
    assert not np.array_equal(_generate(pipe), _generate(pipe, true_cfg_scale=2.0, negative_prompt=""))


@pytest.mark.parametrize("occupant", ["file_inside", "path_is_file"])
def test_refuses_a_path_that_is_not_an_empty_directory(tmp_path: Path, occupant: str) -> None:
    target = tmp_path / "model"
    if occupant == "file_inside":
        target.mkdir()
        (target / "model_index.json").write_text("{}")
    else:
        target.write_text("")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_tiny_flux(target)
