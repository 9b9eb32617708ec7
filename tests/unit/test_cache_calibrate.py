"""TeaCache and step-mask calibration on the shipped tiny model, always on a copy: the shipped folder never changes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.denoiser.cache.policy import (
    COEFFICIENTS_KEY,
    TeaCacheConfig,
    TeaCacheDecider,
    model_teacache_coefficients,
)
from ditserve.services.denoiser.cache.step_masks import STEP_MASKS_KEY, stored_masks
from ditserve.services.families import load_family
from ditserve.services.tools.calibrate import (
    LocalFlux,
    MaskObjective,
    calibrate_step_masks,
    calibrate_teacache,
    calibration_prompts,
    fit_teacache,
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
    published = load_family(folder).published_teacache_coefficients
    assert model_teacache_coefficients(published, folder.sidecar) == coefficients
    decider = TeaCacheDecider(TeaCacheConfig(), model_teacache_coefficients(published, folder.sidecar))
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


def test_mask_objective_is_zero_without_caching_and_grows_with_skipping(model_dir: Path) -> None:
    model = LocalFlux(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    objective = MaskObjective(model, calibration_prompts(1), steps=8, order=1)
    assert objective((True,) * 8) == 0.0  # every step computed is the uncached run, bit for bit
    one = objective((True, True, True, False, True, True, True, True))
    most = objective((True, False, False, True, False, False, False, True))
    assert 0 < one < most


def test_calibrate_step_masks_stores_a_mask_per_count_and_keeps_the_rest(model_dir: Path, model_copy: Path) -> None:
    shipped = (model_dir / SIDECAR).read_bytes()
    sidecar = json.loads((model_copy / SIDECAR).read_text())
    other = {"12": {"6": "110101010001"}}
    (model_copy / SIDECAR).write_text(json.dumps({**sidecar, STEP_MASKS_KEY: other}))

    found = calibrate_step_masks(model_copy, calibration_prompts(1), steps=7, fewest=3)

    assert sorted(found) == [3, 4, 5, 6]
    folder = ModelFolder(model_copy)
    masks = stored_masks(folder.sidecar)
    assert masks[12] == stored_masks({STEP_MASKS_KEY: other})[12]  # another step count's masks kept
    assert {count: mask for count, mask in masks[7].items()} == {count: s.mask for count, s in found.items()}
    assert all(len(mask) == 7 and mask[0] and mask[-1] for mask in masks[7].values())
    assert folder.sidecar["step_mask_calibration"]["7"]["evaluations"] > 0
    assert folder.sidecar[COEFFICIENTS_KEY] == sidecar[COEFFICIENTS_KEY]  # other keys kept
    assert (model_dir / SIDECAR).read_bytes() == shipped


@pytest.mark.parametrize("fewest", [1, 8])
def test_an_impossible_mask_count_is_refused_before_any_model_work(model_copy: Path, fewest: int) -> None:
    with pytest.raises(ValueError, match="--fewest must be in \\[2, 7\\]"):
        calibrate_step_masks(model_copy, steps=8, fewest=fewest)
