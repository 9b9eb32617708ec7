"""TeaCache and step-mask calibration on the shipped tiny model and the tiny Wan folder, always on a copy: the
shipped folder never changes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.denoiser.cache.policy import (
    CALIBRATED,
    COEFFICIENTS_KEY,
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TeaCacheConfig,
    TeaCacheDecider,
    mask_bins,
    model_teacache_coefficients,
)
from ditserve.services.denoiser.cache.step_masks import STEP_MASKS_KEY, mask_forecast_order, stored_masks
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.families import load_family
from ditserve.services.tools.calibrate import (
    MaskObjective,
    calibrate_prompts,
    calibrate_step_masks,
    calibrate_teacache,
    calibration_prompts,
    fit_teacache,
)
from ditserve.services.tools.local_model import LocalModel


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
    model = LocalModel(ModelFolder(model_copy), torch.device("cpu"), torch.float32)

    fit = fit_teacache(model, calibration_prompts(1), steps=6)

    assert len(fit.input_changes) == len(fit.output_changes) == 2 * 5
    assert all(x > 0 for x in fit.input_changes)  # the indicator moves with the timestep at every step


def test_too_few_samples_are_refused(model_dir: Path) -> None:
    model = LocalModel(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_teacache(model, calibration_prompts(1), steps=3)


def test_mask_objective_is_zero_without_caching_and_grows_with_skipping(model_dir: Path) -> None:
    model = LocalModel(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    objective = MaskObjective(model, calibration_prompts(1), steps=8, order=1)
    assert objective((True,) * 8) == 0.0  # every step computed is the uncached run, bit for bit
    one = objective((True, True, True, False, True, True, True, True))
    most = objective((True, False, False, True, False, False, False, True))
    assert 0 < one < most


def test_order_0_masks_reuse_the_last_output_and_say_so(model_dir: Path, model_copy: Path) -> None:
    model = LocalModel(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    mask = (True, True, False, True, False, False, True, True)
    plain, forecast = (MaskObjective(model, calibration_prompts(1), steps=8, order=o)(mask) for o in (0, 1))
    assert plain > 0 and forecast > 0 and plain != forecast  # a different stand-in for the skipped steps

    calibrate_step_masks(model_copy, calibration_prompts(1), steps=7, fewest=5, order=0)
    assert mask_forecast_order(ModelFolder(model_copy).sidecar, 7) == 0
    assert mask_forecast_order(ModelFolder(model_copy).sidecar, 9) == 1  # no masks for 9 steps: the default
    with pytest.raises(ValueError, match="taylorseer_order must be 0, 1 or 2"):
        mask_forecast_order({"step_mask_calibration": {"7": {"taylorseer_order": 3}}}, 7)


def test_the_default_objective_adds_the_worst_prompts_error_to_the_mean(model_dir: Path) -> None:
    model = LocalModel(ModelFolder(model_dir), torch.device("cpu"), torch.float32)
    mask = (True, False, True, False, False, True, False, True)
    mean = MaskObjective(model, calibration_prompts(2), 8, 1, "mean")(mask)
    both = MaskObjective(model, calibration_prompts(2), 8, 1)(mask)
    samples = 2 * 2  # prompts x MASK_SEEDS
    assert 0 < 2 * mean <= both <= (1 + samples) * mean  # the worst lies between the mean and the sum
    with pytest.raises(ValueError, match="objective must be one of"):
        MaskObjective(model, calibration_prompts(1), 8, 1, "median")


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


WAN_PROMPTS = ["a red circle moving right on a blue background", "a green square moving up on a black background"]
WAN_STEPS = 6  # 5 changes per branch: the fewest distinct indicator changes a degree-4 fit takes


@pytest.fixture
def wan_copy(wan_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(wan_model, tmp_path / "wan"))


def test_wan_teacache_indicator_is_the_timestep_projection(wan_model: Path) -> None:
    """Wan's cache_signal, what BranchCache.signal watches: one change per step, whatever the prompt or branch."""
    model = LocalModel(ModelFolder(wan_model), torch.device("cpu"), torch.float32)
    assert model.uses_cfg  # the tiny Wan guides with classic CFG 5 and the empty negative prompt

    fit = fit_teacache(model, WAN_PROMPTS, steps=WAN_STEPS)

    changes = WAN_STEPS - 1
    assert len(fit.input_changes) == len(WAN_PROMPTS) * changes * 2  # both CFG branches
    per_call = fit.input_changes[: changes * 2]
    assert per_call[0::2] == per_call[1::2]  # cond and uncond see the same timestep
    assert fit.input_changes == per_call * len(WAN_PROMPTS)  # every prompt the same
    assert len(set(fit.output_changes)) == len(fit.output_changes)  # the noise prediction does depend on them


def test_wan_calibration_is_stored_and_the_denoisers_facts_load_it(wan_model: Path, wan_copy: Path) -> None:
    coefficients = calibrate_teacache(wan_copy, WAN_PROMPTS, steps=WAN_STEPS)
    found = calibrate_step_masks(wan_copy, WAN_PROMPTS[:1], steps=WAN_STEPS, fewest=3)

    folder = ModelFolder(wan_copy)
    family = load_family(folder)
    facts = ModelFacts.load(folder, family.published_teacache_coefficients, num_blocks=4)
    assert len(coefficients) == 5 and all(math.isfinite(c) for c in coefficients)
    assert facts.teacache_coefficients == coefficients != family.published_teacache_coefficients
    provenance = folder.sidecar["teacache_calibration"]
    assert provenance["guidance_scale"] == 5.0 and provenance["samples"] == len(WAN_PROMPTS) * (WAN_STEPS - 1) * 2
    assert sorted(found) == [3, 4, 5]
    assert dict(facts.step_masks[WAN_STEPS]) == {count: searched.mask for count, searched in found.items()}
    scm = SCMConfig(preset=CALIBRATED, computed_steps=3, policy="static")
    served = facts.accept(CacheConfig(dbcache=DBCacheConfig.whole_step(scm)), WAN_STEPS)
    assert served.dbcache is not None and served.dbcache.scm is not None
    assert tuple(served.dbcache.scm.compute_bins) == mask_bins(found[3].mask)[0]  # preset "calibrated" serves it
    assert folder.sidecar["step_mask_calibration"][str(WAN_STEPS)]["guidance_scale"] == 5.0
    assert not (wan_model / SIDECAR).read_text().count(COEFFICIENTS_KEY)  # the fixture's folder unchanged


def test_a_model_without_a_known_prompt_vocabulary_calibrates_on_a_prompt_file(wan_copy: Path) -> None:
    with pytest.raises(SystemExit, match="--prompt-file"):  # before any model work
        calibrate_teacache(wan_copy, steps=WAN_STEPS)
    sidecar = json.loads((wan_copy / SIDECAR).read_text())
    (wan_copy / SIDECAR).write_text(json.dumps({**sidecar, "prompt_vocabulary": "shapes"}))
    assert calibrate_prompts(wan_copy, None, 2) == calibration_prompts(2)
