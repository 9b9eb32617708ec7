"""bench/common.py: the statistics every bench summarises its rounds with."""

from __future__ import annotations

from ditserve.services.tools.bench.common import median, quartiles


def test_quartiles_bound_the_middle_half_around_the_median() -> None:
    rounds = [1.2, 0.9, 1.0, 1.1, 1.3]
    assert quartiles(rounds) == [1.0, 1.2]
    first, third = quartiles(rounds)
    assert first <= median(rounds) <= third


def test_quartiles_of_one_round_or_none() -> None:
    assert quartiles([1.5]) == [1.5, 1.5]
    assert quartiles([]) == []
