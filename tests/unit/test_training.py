"""train_default_model at toy step counts: checkpoints, resumes exactly where it stopped, and writes a
folder FluxPipeline loads and runs with the sidecar's defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from factories import forbid_latent_pool, weight_digests
from tqdm import tqdm

from ditserve.services.tools.training import loop, train

pytestmark = pytest.mark.slow  # half a minute and more of toy training in set-up: make test-slow

TOY: dict[str, Any] = {
    "vae_steps": 2,
    "transformer_steps": 3,
    "vae_batch_size": 2,
    "transformer_batch_size": 2,
    "latent_pool_size": 8,
    "checkpoint_every_s": 0.0,  # every step
    "progress": False,
}


class _InterruptAfterFirstTransformerStep(tqdm):
    """Ctrl-C as it lands mid-phase: after a step has been taken and checkpointed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase, self.updates = kwargs.get("desc"), 0  # a disabled bar keeps neither

    def update(self, n: float | None = 1) -> bool | None:
        self.updates += 1
        if self.phase == "transformer" and self.updates == 1:
            raise KeyboardInterrupt
        return super().update(n)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    return train.train_default_model(root / "model", checkpoint_dir=root / "checkpoints", **TOY)


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "checkpoints"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "tqdm", _InterruptAfterFirstTransformerStep)
        with pytest.raises(KeyboardInterrupt):
            train.train_default_model(tmp_path / "model", checkpoint_dir=checkpoints, **TOY)
    assert not (tmp_path / "model").exists()
    vae_state = torch.load(checkpoints / "vae.pt", weights_only=True)
    assert (vae_state["step"], len(vae_state["losses"])) == (2, 2)
    assert "latent_stats" in vae_state
    interrupted = torch.load(checkpoints / "transformer.pt", weights_only=True)
    assert (interrupted["step"], len(interrupted["losses"])) == (1, 1)

    resumed = train.train_default_model(tmp_path / "model", checkpoint_dir=checkpoints, **TOY)

    final = torch.load(checkpoints / "transformer.pt", weights_only=True)
    assert final["step"] == 3
    assert final["losses"][:1] == interrupted["losses"]
    reference = torch.load(straight.with_name("checkpoints") / "transformer.pt", weights_only=True)
    assert final["losses"] == reference["losses"]
    assert torch.load(checkpoints / "vae.pt", weights_only=True)["losses"] == vae_state["losses"]
    assert weight_digests(resumed) == weight_digests(straight)


def test_a_run_resumed_after_its_transformer_phase_skips_the_latent_pool(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid_latent_pool(monkeypatch, train._Job)
    again = train.train_default_model(tmp_path / "model", checkpoint_dir=straight.with_name("checkpoints"), **TOY)
    assert weight_digests(again) == weight_digests(straight)


def test_a_checkpoint_past_the_asked_steps_is_refused(straight: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="past the 1 asked for"):
        train.train_default_model(
            tmp_path / "model", checkpoint_dir=straight.with_name("checkpoints"), **{**TOY, "vae_steps": 1}
        )


def test_output_loads_with_flux_pipeline_and_runs_at_the_sidecar_defaults(straight: Path) -> None:
    sidecar = json.loads((straight / "ditserve.json").read_text())
    assert sidecar == train.DITSERVE_DEFAULTS
    assert not [path for path in straight.rglob("*") if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    pipe = FluxPipeline.from_pretrained(straight, local_files_only=True)
    vae_config = pipe.vae.config
    assert pipe.vae_scale_factor == 2 ** (len(train.VAE_CONFIG["block_out_channels"]) - 1)
    # The latent normalisation is measured, not FLUX's or diffusers' defaults.
    assert (vae_config.scaling_factor, vae_config.shift_factor) == tuple(
        torch.load(straight.with_name("checkpoints") / "vae.pt", weights_only=True)["latent_stats"][::-1]
    )
    image = pipe(
        "a red circle on a blue background",
        negative_prompt="",
        true_cfg_scale=sidecar["default_true_cfg_scale"],
        height=sidecar["default_height"],
        width=sidecar["default_width"],
        num_inference_steps=2,
        max_sequence_length=sidecar["default_max_sequence_length"],
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (train.NATIVE_SIZE, train.NATIVE_SIZE)
    assert np.asarray(image).std() > 0
