"""TeaCache calibration on the shipped tiny model, always on a copy: the shipped folder must never change."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.denoiser.cache.calibrate import (
    LocalFlux,
    calibrate_teacache,
    calibration_prompts,
    fit_teacache,
)
from ditserve.services.denoiser.cache.policy import (
    COEFFICIENTS_KEY,
    TeaCacheConfig,
    TeaCacheDecider,
    model_teacache_coefficients,
)


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def test_calibrate_writes_five_finite_coefficients_into_the_sidecar(model_dir: Path, model_copy: Path) -> None:
    shipped = (model_dir / SIDECAR).read_bytes()
    before = json.loads((model_copy / SIDECAR).read_text())

    coefficients = calibrate_teacache(model_copy, calibration_prompts(2), steps=6)

    assert len(coefficients) == 5 and all(math.isfinite(c) for c in coefficients)
    folder = ModelFolder(model_copy)
    assert folder.sidecar[COEFFICIENTS_KEY] == list(coefficients)
    branches = 2 if folder.defaults.true_cfg_scale > 1 else 1  # the shipped model guides with true CFG
    assert folder.sidecar["teacache_calibration"]["samples"] == 2 * 5 * branches  # per prompt, steps - 1 changes
    kept = {key: value for key, value in before.items() if not key.startswith("teacache_")}
    assert {key: folder.sidecar[key] for key in kept} == kept  # every other key kept
    assert folder.defaults == ModelFolder(model_dir).defaults
    # What the denoiser will do with them: a TeaCache decider accepts them as this model's coefficients.
    assert model_teacache_coefficients(folder.family, folder.sidecar) == coefficients
    decider = TeaCacheDecider(TeaCacheConfig(), model_teacache_coefficients(folder.family, folder.sidecar))
    assert decider.coefficients == coefficients
    assert (model_dir / SIDECAR).read_bytes() == shipped


def test_true_cfg_calibrates_both_branches(model_copy: Path) -> None:
    sidecar = json.loads((model_copy / SIDECAR).read_text())
    (model_copy / SIDECAR).write_text(json.dumps({**sidecar, "default_true_cfg_scale": 2.0}))
    model = LocalFlux(ModelFolder(model_copy), torch.device("cpu"), torch.float32)

    fit = fit_teacache(model, calibration_prompts(1), steps=6)

    assert len(fit.input_changes) == len(fit.output_changes) == 2 * 5
    assert all(x > 0 for x in fit.input_changes)  # the indicator moves with the timestep at every step


def test_too_few_samples_are_refused(model_dir: Path) -> None:
    model = LocalFlux(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_teacache(model, calibration_prompts(1), steps=3)
