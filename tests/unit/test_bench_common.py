"""bench/common.py: the statistics every bench summarises its rounds with."""

from __future__ import annotations

import os
import time

from ditserve.services.tools.bench.common import median, process_cpu_seconds, quartiles


def test_quartiles_bound_the_middle_half_around_the_median() -> None:
    rounds = [1.2, 0.9, 1.0, 1.1, 1.3]
    assert quartiles(rounds) == [1.0, 1.2]
    first, third = quartiles(rounds)
    assert first <= median(rounds) <= third


def test_quartiles_of_one_round_or_none() -> None:
    assert quartiles([1.5]) == [1.5, 1.5]
    assert quartiles([]) == []


def test_process_cpu_seconds_counts_work_not_waiting() -> None:
    before = process_cpu_seconds(os.getpid())
    time.sleep(0.2)
    slept = process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    worked = process_cpu_seconds(os.getpid())
    assert slept - before < 0.1  # clock ticks: 10 ms each
    assert 0.25 <= worked - slept < 1.0
