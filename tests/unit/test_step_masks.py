"""The step-mask search and the calibrated preset, as pure logic on synthetic objectives (no torch)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import (
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TaylorSeerConfig,
    mask_bins,
    scm_mask,
)
from ditserve.services.denoiser.cache.step_masks import (
    MASK_CALIBRATION_KEY,
    STEP_MASKS_KEY,
    Mask,
    describe_masks,
    mask_orders,
    mask_text,
    parse_mask,
    resolve,
    search_masks,
    stored_masks,
)


def dropped(mask: Mask) -> set[int]:
    return {step for step, compute in enumerate(mask) if not compute}


def brute_force(steps: int, computed: int, error: object) -> float:
    """The least error over every mask with `computed` steps whose first and last compute."""
    inner = range(1, steps - 1)
    return min(
        error(tuple(step not in cached for step in range(steps)))  # type: ignore[operator]
        for cached in itertools.combinations(inner, steps - computed)
    )


def test_every_mask_computes_its_count_and_both_ends() -> None:
    found = search_masks(12, 3, lambda mask: float(sum(mask)))
    assert sorted(found) == list(range(3, 12))
    for computed, searched in found.items():
        assert len(searched.mask) == 12 and sum(searched.mask) == computed
        assert searched.mask[0] and searched.mask[-1]


def test_an_additive_objective_is_solved_exactly() -> None:
    """When each cached step costs its own weight, the best k-mask caches the cheapest steps: greedy's case."""
    weights = [0, 5, 1, 7, 2, 9, 3, 4, 8, 0]

    def error(mask: Mask) -> float:
        return float(sum(weights[step] for step in dropped(mask)))

    found = search_masks(len(weights), 2, error)
    for computed, searched in found.items():
        assert searched.error == brute_force(len(weights), computed, error)


def test_polish_reaches_a_mask_greedy_alone_cannot() -> None:
    """Greedy keeps step 2 cached once it dropped it; the best pair of cached steps is {1, 3}."""
    costs = {frozenset({2}): 1.0, frozenset({1}): 2.0, frozenset({3}): 2.0, frozenset({4}): 2.0}
    costs[frozenset({1, 3})] = 3.0

    def error(mask: Mask) -> float:
        return costs.get(frozenset(dropped(mask)), 10.0)

    found = search_masks(6, 4, error)
    assert dropped(found[5].mask) == {2}
    assert dropped(found[4].mask) == {1, 3} and found[4].error == 3.0
    assert found[4].error == brute_force(6, 4, error)


def test_each_mask_is_evaluated_once() -> None:
    calls: Counter[Mask] = Counter()

    def error(mask: Mask) -> float:
        calls[mask] += 1
        return float(sum(step * step for step in dropped(mask)) % 7)

    search_masks(10, 3, error)
    assert calls and max(calls.values()) == 1


def test_levels_are_reported_as_they_are_found() -> None:
    seen: list[int] = []
    search_masks(8, 4, lambda mask: 0.0, on_level=lambda computed, _: seen.append(computed))
    assert seen == [7, 6, 5, 4]


@pytest.mark.parametrize(("steps", "fewest"), [(2, 2), (10, 1), (10, 10)])
def test_impossible_searches_are_refused(steps: int, fewest: int) -> None:
    with pytest.raises(ValueError):
        search_masks(steps, fewest, lambda mask: 0.0)


def test_masks_round_trip_through_text_and_bins() -> None:
    mask = parse_mask("1101000011")
    assert mask_text(mask) == "1101000011"
    assert scm_mask(mask_bins(mask), len(mask)) == list(mask)
    with pytest.raises(ValueError):
        parse_mask("10a1")


def calibrated(computed: int, policy: str = "static", order: int = 1) -> CacheConfig:
    scm = SCMConfig(preset="calibrated", computed_steps=computed, policy=policy)
    taylorseer = TaylorSeerConfig(order=order) if order else None
    return CacheConfig(dbcache=DBCacheConfig(fn=0, taylorseer=taylorseer, scm=scm))


SIDECAR = {STEP_MASKS_KEY: {"10": {"4": "1100010001", "5": "1101010001"}}}


def test_resolve_gives_the_stored_mask_as_bins() -> None:
    masks = stored_masks(SIDECAR)
    config = resolve(calibrated(4), 10, masks, mask_orders(SIDECAR))
    assert config.dbcache is not None and config.dbcache.scm is not None
    assert config.dbcache.scm.preset is None and config.dbcache.scm.policy == "static"
    assert mask_text(tuple(config.dbcache.scm.mask(10))) == "1100010001"
    assert config.dbcache.taylorseer == TaylorSeerConfig(order=1) and config.dbcache.fn == 0
    other = CacheConfig(dbcache=DBCacheConfig(scm=SCMConfig(preset="fast")))
    assert resolve(other, 10, masks, mask_orders(SIDECAR)) is other


@pytest.mark.parametrize(
    ("computed", "steps", "masks", "field"),
    [
        (4, 12, SIDECAR, "dbcache.scm.preset"),
        (4, 10, {}, "dbcache.scm.preset"),
        (7, 10, SIDECAR, "dbcache.scm.computed_steps"),
    ],
)
def test_resolve_names_what_the_model_lacks(computed: int, steps: int, masks: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(calibrated(computed), steps, stored_masks(masks), mask_orders(masks))
    assert caught.value.field == field


def searched_for(order: int) -> dict:
    return {**SIDECAR, MASK_CALIBRATION_KEY: {"10": {"taylorseer_order": order}}}


@pytest.mark.parametrize("order", [0, 1, 2])
def test_resolve_serves_a_mask_with_the_forecast_it_was_searched_for(order: int) -> None:
    sidecar = searched_for(order)
    assert mask_orders(sidecar) == {10: order}
    config = resolve(calibrated(4, order=order), 10, stored_masks(sidecar), mask_orders(sidecar))
    assert config.dbcache is not None and config.dbcache.scm is not None and config.dbcache.scm.preset is None


@pytest.mark.parametrize(
    ("order", "asked", "words"),
    [(0, 1, "searched for plain reuse"), (1, 0, "searched for TaylorSeer order 1"), (1, 2, "order 1")],
)
def test_resolve_refuses_another_forecast_than_the_masks(order: int, asked: int, words: str) -> None:
    sidecar = searched_for(order)
    with pytest.raises(InvalidArgument, match=words) as caught:
        resolve(calibrated(4, order=asked), 10, stored_masks(sidecar), mask_orders(sidecar))
    assert caught.value.field == "dbcache.taylorseer"


def test_describe_masks_says_what_a_request_may_ask_for() -> None:
    sidecar = {**searched_for(0), STEP_MASKS_KEY: {**SIDECAR[STEP_MASKS_KEY], "6": {"3": "101001"}}}
    assert describe_masks(stored_masks(sidecar), mask_orders(sidecar)) == (
        "6 steps: 3-3 computed, TaylorSeer order 1; 10 steps: 4-5 computed, plain reuse"
    )
    assert describe_masks({}, {}).startswith("none")


def test_an_unresolved_calibrated_mask_is_never_used() -> None:
    with pytest.raises(ValueError, match="resolve"):
        calibrated(4).dbcache.scm.mask(10)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"preset": "calibrated"}, "dbcache.scm.computed_steps"),
        ({"preset": "calibrated", "computed_steps": 1}, "dbcache.scm.computed_steps"),
        ({"preset": "fast", "computed_steps": 8}, "dbcache.scm.computed_steps"),
    ],
)
def test_calibrated_preset_validation(options: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        SCMConfig(**options)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "sidecar",
    [
        {STEP_MASKS_KEY: ["1101"]},
        {STEP_MASKS_KEY: {"4": ["1101"]}},
        {STEP_MASKS_KEY: {"4": {"3": "11x1"}}},
        {STEP_MASKS_KEY: {"4": {"2": "1101"}}},
        {STEP_MASKS_KEY: {"5": {"3": "1101"}}},
    ],
)
def test_malformed_stored_masks_are_refused(sidecar: dict) -> None:
    with pytest.raises(ValueError):
        stored_masks(sidecar)
