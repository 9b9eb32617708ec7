"""Step-cache decisions on synthetic series: TeaCache, DBCache, SCM masks, TaylorSeer, config validation.

No torch here: the policy module is pure, and these tests drive it with floats and numpy arrays.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import (
    COEFFICIENTS_KEY,
    CacheConfig,
    DBCacheConfig,
    DBCacheDecider,
    SCMConfig,
    TaylorSeer,
    TaylorSeerConfig,
    TeaCacheConfig,
    TeaCacheDecider,
    model_teacache_coefficients,
    scm_mask,
)
from ditserve.services.families.flux import FAMILY, FLUX1_TEACACHE_COEFFICIENTS

# cache-dit's published 28-step masks (caching/cache_interface.py, steps_mask), 1 = compute.
PUBLISHED_MASKS = {
    "slow": "1111111101110011100110010001",
    "medium": "1111110110001100011000110001",
    "fast": "1111110100010000100000100001",
    "ultra": "1111001000001000000100000001",
}
IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # rescale(x) = x, so the series below read directly


def _bits(mask: list[bool]) -> str:
    return "".join("1" if compute else "0" for compute in mask)


def _run(decide: Callable[[int, int, float | None], bool], series: list[float | None]) -> str:
    return "".join("1" if decide(step, len(series), value) else "0" for step, value in enumerate(series))


def test_policy_module_imports_without_torch() -> None:
    code = "import sys, ditserve.services.denoiser.cache.policy; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("preset", sorted(PUBLISHED_MASKS))
def test_scm_presets_at_28_steps_are_the_published_masks(preset: str) -> None:
    assert _bits(scm_mask(preset, 28)) == PUBLISHED_MASKS[preset]
    assert _bits(SCMConfig(preset=preset).mask(28)) == PUBLISHED_MASKS[preset]


@pytest.mark.parametrize("preset", sorted(PUBLISHED_MASKS))
def test_scm_presets_scale_proportionally(preset: str) -> None:
    # Twice the steps: every run boundary doubles exactly, so every step of the 28-step mask doubles.
    assert _bits(scm_mask(preset, 56)) == "".join(bit * 2 for bit in PUBLISHED_MASKS[preset])


@given(steps=st.integers(1, 200), preset=st.sampled_from(sorted(PUBLISHED_MASKS)))
def test_scm_masks_fit_any_step_count_and_compute_the_ends(steps: int, preset: str) -> None:
    mask = scm_mask(preset, steps)
    assert len(mask) == steps
    assert mask[0] and mask[-1]


def test_scm_explicit_bins_at_their_own_length_and_scaled() -> None:
    assert _bits(scm_mask(((2, 3), (2,)), 7)) == "1100111"
    assert _bits(scm_mask(((2,), (3,)), 5)) == "11001"  # the last step computes all the same
    assert _bits(SCMConfig(compute_bins=(2, 3), cache_bins=(2,)).mask(14)) == "11110000111111"


def test_teacache_accumulates_and_resets_at_the_threshold() -> None:
    decider = TeaCacheDecider(TeaCacheConfig(threshold=0.25, coefficients=IDENTITY), None)
    # 0.1 per step: skip, skip, then 0.3 >= 0.25 computes and resets; the last step is always computed.
    assert _run(decider.decide, [None] + [0.1] * 9) == "1001001001"


def test_teacache_forces_first_and_last_steps() -> None:
    config = TeaCacheConfig(threshold=10.0, coefficients=IDENTITY, forced_first_steps=2, forced_last_steps=3)
    assert _run(TeaCacheDecider(config, None).decide, [None] + [0.0] * 9) == "1100000111"


def test_teacache_threshold_zero_computes_every_step() -> None:
    decider = TeaCacheDecider(TeaCacheConfig(threshold=0.0, coefficients=IDENTITY), None)
    assert _run(decider.decide, [None] + [0.0] * 9) == "1" * 10


def test_teacache_uses_the_models_coefficients_when_the_request_has_none() -> None:
    decider = TeaCacheDecider(TeaCacheConfig(), FLUX1_TEACACHE_COEFFICIENTS)
    assert decider.coefficients == FLUX1_TEACACHE_COEFFICIENTS
    assert decider.rescale(0.0) == pytest.approx(0.264230861)
    assert decider.rescale(0.1) == pytest.approx(float(np.poly1d(FLUX1_TEACACHE_COEFFICIENTS)(0.1)))
    with pytest.raises(InvalidArgument) as error:
        TeaCacheDecider(TeaCacheConfig(), None)
    assert error.value.field == "teacache.coefficients"
    assert TeaCacheDecider(TeaCacheConfig(coefficients=IDENTITY), None).rescale(0.5) == 0.5


def test_a_models_calibrated_coefficients_win_over_its_familys() -> None:
    calibrated = (1.0, 2.0, 3.0, 4.0, 5.0)
    flux = FAMILY.published_teacache_coefficients
    assert flux == FLUX1_TEACACHE_COEFFICIENTS
    assert model_teacache_coefficients(flux, {}) == FLUX1_TEACACHE_COEFFICIENTS
    assert model_teacache_coefficients(None, {}) is None  # a family with none published
    assert model_teacache_coefficients(flux, {COEFFICIENTS_KEY: list(calibrated)}) == calibrated
    assert model_teacache_coefficients(None, {COEFFICIENTS_KEY: list(calibrated)}) == calibrated
    # A request's own coefficients still win over the model's.
    assert TeaCacheDecider(TeaCacheConfig(coefficients=IDENTITY), calibrated).coefficients == IDENTITY
    for broken in ([1.0, 2.0], "12345", [1, 2, 3, 4, float("nan")]):
        with pytest.raises(InvalidArgument) as error:
            model_teacache_coefficients(flux, {COEFFICIENTS_KEY: broken})
        assert error.value.field == "teacache.coefficients"


def test_dbcache_defaults_are_sglangs() -> None:
    config = DBCacheConfig()
    assert (config.fn, config.bn, config.residual_diff_threshold) == (1, 0, 0.24)
    assert (config.max_warmup_steps, config.max_continuous_cached_steps) == (4, 3)
    assert config.taylorseer is None and TaylorSeerConfig().order == 1
    assert config.max_cached_steps == -1 and config.warmup_interval == 1
    assert SCMConfig(preset="fast").policy == "dynamic"
    assert CacheConfig().mode == "none"


def test_dbcache_warmup_then_consecutive_cap() -> None:
    decider = DBCacheDecider(DBCacheConfig())
    # Warmup computes 4 steps whatever the diff; then at most 3 cached steps in a row.
    assert _run(decider.decide, [None] + [0.01] * 11) == "111100010001"
    assert decider.cached_steps == 6


def test_dbcache_caches_only_below_the_threshold() -> None:
    decider = DBCacheDecider(DBCacheConfig(max_warmup_steps=1, max_continuous_cached_steps=-1))
    assert _run(decider.decide, [None, 0.1, 0.3, 0.23, 0.24, 0.0]) == "101010"


def test_dbcache_threshold_zero_never_caches() -> None:
    decider = DBCacheDecider(DBCacheConfig(residual_diff_threshold=0.0, max_warmup_steps=0))
    assert _run(decider.decide, [None] + [0.0] * 7) == "1" * 8


def test_dbcache_caps_total_cached_steps() -> None:
    decider = DBCacheDecider(DBCacheConfig(max_warmup_steps=0, max_cached_steps=2))
    assert _run(decider.decide, [None] + [0.0] * 7) == "10011111"


def test_dbcache_warmup_interval_computes_every_other_warmup_step() -> None:
    decider = DBCacheDecider(DBCacheConfig(max_warmup_steps=4, warmup_interval=2))
    assert _run(decider.decide, [None] + [0.0] * 5) == "101000"


def test_scm_static_mask_decides_alone() -> None:
    # Large diffs would compute and the consecutive cap would interrupt runs: static ignores both.
    config = DBCacheConfig(scm=SCMConfig(preset="fast", policy="static"))
    assert _run(DBCacheDecider(config).decide, [None] + [5.0] * 27) == PUBLISHED_MASKS["fast"]


def test_fn_0_needs_no_signal_and_follows_its_static_mask() -> None:
    # Fn 0 has no residual to compare, so every step sees None: the mask alone decides, warmup aside.
    config = DBCacheConfig(fn=0, scm=SCMConfig(preset="fast", policy="static"))
    assert _run(DBCacheDecider(config).decide, [None] * 28) == PUBLISHED_MASKS["fast"]
    with pytest.raises(InvalidArgument, match="static"):
        DBCacheConfig(fn=0, scm=SCMConfig(preset="fast", policy="dynamic"))


def test_scm_dynamic_mask_zero_steps_still_follow_the_diff() -> None:
    config = DBCacheConfig(scm=SCMConfig(preset="fast"), max_continuous_cached_steps=-1)
    assert _run(DBCacheDecider(config).decide, [None] + [0.0] * 27) == PUBLISHED_MASKS["fast"]
    # A large diff at mask-0 steps 8 and 10 computes them; mask-1 steps compute with any diff.
    series: list[float | None] = [None] + [0.0] * 27
    series[8] = series[10] = 0.5
    expected = list(PUBLISHED_MASKS["fast"])
    expected[8] = expected[10] = "1"
    assert _run(DBCacheDecider(config).decide, series) == "".join(expected)


def test_scm_mask_bounds_the_warmup() -> None:
    # ultra computes only 4 leading steps: a warmup of 8 stops there, so steps 4 and 5 may cache.
    config = DBCacheConfig(max_warmup_steps=8, scm=SCMConfig(preset="ultra", policy="dynamic"))
    assert _run(DBCacheDecider(config).decide, [None] + [0.0] * 27)[:6] == "111100"


@pytest.mark.parametrize("steps", [(0, 1, 2), (0, 2, 7), (3, 4, 10)])
def test_taylorseer_order_1_is_exact_on_linear_series(steps: tuple[int, ...]) -> None:
    seer: TaylorSeer[float] = TaylorSeer(order=1)
    for step in steps:
        seer.update(step, 2.5 - 0.75 * step)
    for step in (steps[-1] + 1, steps[-1] + 4):
        assert seer.predict(step) == pytest.approx(2.5 - 0.75 * step)


@pytest.mark.parametrize("steps", [(0, 1, 2), (0, 1, 3), (2, 5, 6, 9)])
def test_taylorseer_order_2_is_exact_on_quadratic_series(steps: tuple[int, ...]) -> None:
    base = np.array([1.0, -2.0, 0.5])

    def series(step: int) -> np.ndarray:
        return base * (0.3 * step**2 - 1.5 * step + 4.0)

    seer: TaylorSeer[np.ndarray] = TaylorSeer(order=2)
    for step in steps:
        seer.update(step, series(step))
    for step in (steps[-1] + 1, steps[-1] + 3):
        np.testing.assert_allclose(seer.predict(step), series(step), rtol=1e-12)
    linear: TaylorSeer[np.ndarray] = TaylorSeer(order=1)
    for step in steps:
        linear.update(step, series(step))
    assert not np.allclose(linear.predict(steps[-1] + 3), series(steps[-1] + 3))


def test_taylorseer_with_few_points_and_order_0_reuse_the_last_value() -> None:
    seer: TaylorSeer[float] = TaylorSeer(order=2)
    seer.update(0, 3.0)
    assert seer.predict(4) == 3.0  # one point: nothing to differentiate yet
    reuse: TaylorSeer[float] = TaylorSeer(order=0)
    reuse.update(0, 1.0)
    reuse.update(1, 7.0)
    assert reuse.predict(5) == 7.0
    with pytest.raises(ValueError, match="increase"):
        reuse.update(1, 8.0)
    with pytest.raises(ValueError, match="update"):
        TaylorSeer(order=1).predict(0)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TeaCacheConfig(threshold=-0.1), "teacache.threshold"),
        (lambda: TeaCacheConfig(threshold=float("nan")), "teacache.threshold"),
        (lambda: TeaCacheConfig(coefficients=(1.0, 2.0)), "teacache.coefficients"),
        (lambda: TeaCacheConfig(coefficients="12345"), "teacache.coefficients"),
        (lambda: TeaCacheConfig(forced_first_steps=0), "teacache.forced_first_steps"),
        (lambda: TeaCacheConfig(forced_last_steps=0), "teacache.forced_last_steps"),
        (lambda: DBCacheConfig(fn=0), "dbcache.fn"),
        (lambda: DBCacheConfig(fn=True), "dbcache.fn"),
        (lambda: DBCacheConfig(bn=-1), "dbcache.bn"),
        (lambda: DBCacheConfig(residual_diff_threshold=-1.0), "dbcache.residual_diff_threshold"),
        (lambda: DBCacheConfig(residual_diff_threshold="0.2"), "dbcache.residual_diff_threshold"),
        (lambda: DBCacheConfig(max_warmup_steps=-1), "dbcache.max_warmup_steps"),
        (lambda: DBCacheConfig(warmup_interval=0), "dbcache.warmup_interval"),
        (lambda: DBCacheConfig(max_cached_steps=-2), "dbcache.max_cached_steps"),
        (lambda: DBCacheConfig(max_continuous_cached_steps=1.5), "dbcache.max_continuous_cached_steps"),
        (lambda: DBCacheConfig(taylorseer={"order": 1}), "dbcache.taylorseer"),
        (lambda: TaylorSeerConfig(order=3), "dbcache.taylorseer.order"),
        (lambda: TaylorSeerConfig(order=0), "dbcache.taylorseer.order"),
        (lambda: SCMConfig(), "dbcache.scm.preset"),
        (lambda: SCMConfig(preset="turbo"), "dbcache.scm.preset"),
        (lambda: SCMConfig(preset="fast", compute_bins=(4,), cache_bins=(2,)), "dbcache.scm"),
        (lambda: SCMConfig(compute_bins=(4, 0), cache_bins=(2,)), "dbcache.scm.compute_bins"),
        (lambda: SCMConfig(compute_bins=(), cache_bins=()), "dbcache.scm.compute_bins"),
        (lambda: SCMConfig(compute_bins=(4,), cache_bins=(2, 2)), "dbcache.scm.cache_bins"),
        (lambda: SCMConfig(compute_bins=(4,)), "dbcache.scm.cache_bins"),
        (lambda: SCMConfig(preset="fast", policy="sometimes"), "dbcache.scm.policy"),
        (lambda: CacheConfig(teacache=TeaCacheConfig(), dbcache=DBCacheConfig()), "cache"),
        (lambda: DBCacheConfig(fn=2, bn=1).check_blocks(3), "dbcache.fn"),
        (lambda: scm_mask("fast", 0), "steps"),
    ],
)
def test_invalid_values_name_their_field(build: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        build()
    assert error.value.field == field


def test_teacache_takes_taylorseer_and_names_its_field() -> None:
    config = TeaCacheConfig(0.1, taylorseer=TaylorSeerConfig(order=2, parent="teacache"))
    assert config.taylorseer.order == 2 and config.taylorseer == TaylorSeerConfig(order=2)
    with pytest.raises(InvalidArgument) as error:
        TaylorSeerConfig(order=3, parent="teacache")
    assert error.value.field == "teacache.taylorseer.order"
    with pytest.raises(InvalidArgument) as error:
        TeaCacheConfig(taylorseer={"order": 1})
    assert error.value.field == "teacache.taylorseer"
