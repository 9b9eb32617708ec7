"""bench serving's per-row arithmetic: requests per second, latency percentiles, CPU per request."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from ditserve.services.tools.bench.serving import _row, poisson_arrivals


def runner(latencies: list[float]) -> SimpleNamespace:
    return SimpleNamespace(latencies=latencies, queue_ms=[1.0] * len(latencies), errors=0)


def test_a_row_divides_each_processs_cpu_by_the_requests_it_served() -> None:
    row = _row("continuous", "closed", 8, runner([0.4, 0.2, 0.3, 0.5]), 2.0, 40.0, 20, {"denoiser": 1.0, "vae": 0.5})
    assert row["req_per_s"] == 2.0 and row["mean_batch_size"] == 2.0  # 4 requests of 20 steps in 40 steps
    assert row["latency_p50_s"] == 0.35 and row["latency_p99_s"] == 0.5
    assert row["cpu_ms_per_request"] == {"denoiser": 250.0, "vae": 125.0, "total": 375.0}


def test_a_row_that_served_nothing_has_no_cpu_per_request() -> None:
    row = _row("off", "open", 2.0, runner([]), 1.0, 0.0, 20, {"denoiser": 0.3})
    assert row["completed"] == 0 and row["cpu_ms_per_request"] is None and row["latency_p99_s"] is None


def test_open_loop_arrivals_are_a_fixed_count_at_the_asked_rate_and_repeat_per_seed() -> None:
    arrivals = poisson_arrivals(4.0, 2000, seed=0)
    assert len(arrivals) == 2000 and all(b > a for a, b in itertools.pairwise(arrivals))
    assert abs(arrivals[-1] / 2000 - 0.25) < 0.025  # mean gap 1/rate
    assert poisson_arrivals(4.0, 50, seed=0) == arrivals[:50] and poisson_arrivals(4.0, 50, seed=1) != arrivals[:50]
