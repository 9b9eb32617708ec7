"""The budget policy: exactly k computed steps per branch, which ones chosen per request at run time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.budget import BudgetDecider, second_divided_difference
from ditserve.services.denoiser.cache.policy import (
    BUDGET_THRESHOLD,
    CALIBRATED,
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    mask_bins,
)
from ditserve.services.denoiser.cache.step_masks import parse_mask, resolve
from ditserve.services.denoiser.cache.wire import cache_config
from ditserve.v1 import cache_pb2

PLAN = parse_mask("1010101000100010000001000001")  # the default model's calibrated 8-of-28 mask
STEPS = len(PLAN)


def run(curvatures: list[float], threshold: float = BUDGET_THRESHOLD, plan: tuple[bool, ...] = PLAN) -> list[bool]:
    """Decisions over a whole request; curvatures[i] is observed after the i-th computed step (from the 3rd)."""
    decider = BudgetDecider(lambda steps: plan, threshold)
    decisions = []
    for step in range(len(plan)):
        computed = decider.decide(step, len(plan))
        decisions.append(computed)
        if computed and len(decider.computed) >= 3:
            decider.observe(curvatures[(len(decider.computed) - 3) % len(curvatures)])
    return decisions


@pytest.mark.parametrize("seed", range(20))
def test_the_budget_is_spent_exactly_with_first_and_last_computed(seed: int) -> None:
    curvatures = list(np.random.default_rng(seed).lognormal(-3, 2, size=30))
    decisions = run(curvatures)
    assert sum(decisions) == sum(PLAN)
    assert decisions[0] and decisions[-1]


def test_it_follows_the_plan_until_three_outputs_exist() -> None:
    decisions = run([math.inf])
    assert decisions[:5] == list(PLAN[:5])  # steps 0, 2, 4 computed as planned


def test_a_huge_error_spends_early_and_a_tiny_one_late() -> None:
    k = sum(PLAN)
    eager = run([1e9])
    lazy = run([0.0])
    assert eager == list(PLAN[:5]) + [True] * (k - 4) + [False] * (STEPS - k - 2) + [True]
    # no error: nothing computes while the plan still has steps ahead; then the budget is spent
    last_planned = max(step for step in range(STEPS - 1) if PLAN[step])
    assert not any(lazy[5 : last_planned + 1])
    assert sum(lazy) == k


def test_a_curved_request_computes_sooner_than_a_straight_one() -> None:
    straight, curved = run([0.01]), run([0.05])
    assert sum(straight) == sum(curved)
    assert straight.index(True, 5) > curved.index(True, 5)


def test_an_unreadable_estimate_computes() -> None:
    assert run([math.nan])[5]


def test_decisions_are_deterministic_and_independent_per_request() -> None:
    alone = [run([0.01]), run([0.05])]
    first, second = BudgetDecider(lambda steps: PLAN, 0.2), BudgetDecider(lambda steps: PLAN, 0.2)
    together: list[list[bool]] = [[], []]
    for step in range(STEPS):  # interleaved, as two requests of one batch
        for decider, curvature, decisions in ((first, 0.01, together[0]), (second, 0.05, together[1])):
            decisions.append(decider.decide(step, STEPS))
            if decisions[-1] and len(decider.computed) >= 3:
                decider.observe(curvature)
    assert together == alone


def test_a_plan_of_another_length_is_refused() -> None:
    decider = BudgetDecider(lambda steps: PLAN, 0.2)
    with pytest.raises(ValueError, match="one decision per step"):
        decider.decide(0, 12)


def test_the_second_divided_difference_is_exact_on_a_quadratic() -> None:
    points = [(t, 3.0 * t * t - 2.0 * t + 1.0) for t in (9, 4, 2)]  # uneven gaps
    assert second_divided_difference(points) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="3 points"):
        second_divided_difference(points[:2])


def test_the_budget_policy_is_whole_step_only() -> None:
    scm = SCMConfig(preset="ultra", policy="budget", budget_threshold=0.5)
    assert DBCacheConfig.whole_step(scm).scm.threshold == 0.5
    assert SCMConfig(preset="ultra", policy="budget").threshold == BUDGET_THRESHOLD
    with pytest.raises(InvalidArgument) as caught:
        DBCacheConfig(fn=1, scm=scm)
    assert caught.value.field == "dbcache.scm.policy"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"policy": "static", "budget_threshold": 0.2}, "dbcache.scm.budget_threshold"),
        ({"policy": "budget", "budget_threshold": -1.0}, "dbcache.scm.budget_threshold"),
        ({"policy": "budget", "budget_threshold": math.nan}, "dbcache.scm.budget_threshold"),
        ({"policy": "often"}, "dbcache.scm.policy"),
    ],
)
def test_invalid_budget_settings_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        SCMConfig(preset="ultra", **options)
    assert caught.value.field == field


def test_the_wire_carries_the_threshold_and_names_its_field() -> None:
    message = cache_pb2.CachePolicy()
    message.dbcache.fn = 0
    message.dbcache.bn = 0
    message.dbcache.scm.preset = "ultra"
    message.dbcache.scm.policy = "budget"
    message.dbcache.scm.budget_threshold = 0.5
    assert cache_config(message).dbcache.scm.threshold == 0.5
    message.dbcache.scm.budget_threshold = -0.5
    with pytest.raises(InvalidArgument) as caught:
        cache_config(message)
    assert caught.value.field == "cache.dbcache.scm.budget_threshold"


def test_a_calibrated_plan_resolves_to_its_bins_keeping_the_budget_settings() -> None:
    scm = SCMConfig(preset=CALIBRATED, computed_steps=8, policy="budget", budget_threshold=0.3)
    config = resolve(CacheConfig(dbcache=DBCacheConfig.whole_step(scm)), STEPS, {STEPS: {8: PLAN}})
    resolved = config.dbcache.scm
    assert (resolved.compute_bins, resolved.cache_bins) == mask_bins(PLAN)
    assert (resolved.policy, resolved.threshold) == ("budget", 0.3)
