"""make-model --preset ... --random-weights: configs only, components built with random weights at load time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditserve.client.cli import MODEL_PRESETS, main
from ditserve.services.common.model import ModelFolder
from ditserve.services.common.stage import StageContext
from ditserve.services.tools.modelgen.presets import PRESETS
from ditserve.services.tools.modelgen.tiny_flux import TINY_TRANSFORMER

META = torch.device("meta")


def test_the_cli_offers_every_preset() -> None:
    assert set(MODEL_PRESETS) == set(PRESETS)


def test_tiny_preset_loads_random_seeded_weights_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["make-model", "--preset", "tiny-flux", "--random-weights", str(tmp_path / "m")]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    assert not list((tmp_path / "m").rglob("*.safetensors")), "a random-weights folder holds no weights"
    folder = ModelFolder(tmp_path / "m")
    assert folder.random_weights and json.loads((tmp_path / "m" / "ditserve.json").read_text())["preset"] == "tiny-flux"
    first = folder.load("transformer", torch.device("cpu"), torch.float32)
    second = folder.load("transformer", torch.device("cpu"), torch.float32)
    assert {key: first.config[key] for key in ("num_layers", "num_single_layers", "attention_head_dim")} == {
        key: TINY_TRANSFORMER[key] for key in ("num_layers", "num_single_layers", "attention_head_dim")
    }
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b), "replicas must hold the same random weights"
    stage = StageContext(role="vae", folder=folder, device=torch.device("cpu"), dtype=torch.float32)
    assert "random" in stage.info().details["weights"]


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("preset", "sizes"),
    [
        # Published sizes: FLUX.1 12B (11.9B), CLIP-L text 123M, T5-XXL encoder 4.76B.
        (
            "flux.1-dev",
            {"transformer": (11.8e9, 12.0e9), "text_encoder": (1.2e8, 1.25e8), "text_encoder_2": (4.7e9, 4.8e9)},
        ),
        # Wan2.1-T2V-1.3B ("1.3B", 1.42B counted), UMT5-XXL encoder 5.7B (its 256k vocabulary).
        ("wan2.1-t2v-1.3b", {"transformer": (1.3e9, 1.5e9), "text_encoder": (5.6e9, 5.8e9)}),
    ],
)
def test_full_size_presets_have_the_published_sizes(tmp_path: Path, preset: str, sizes: dict) -> None:
    from ditserve.services.tools.modelgen.presets import write_preset

    folder = ModelFolder(write_preset(preset, tmp_path / preset))
    for component, (low, high) in sizes.items():
        count = _parameters(folder.load(component, META, torch.bfloat16))  # meta: the shapes, no memory
        assert low <= count <= high, f"{preset} {component}: {count / 1e9:.3f}B parameters"
