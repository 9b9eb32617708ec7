"""The engine ends a job whose caller's deadline passed, waiting or running, with DEADLINE_EXCEEDED, frees
its batch slot at the next step and counts it. A fake runner stands in for the model (the engine never
sees tensors), so this runs without torch; the real denoiser's path is tests/integration/test_deadlines.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ditserve.services.common.errors import DeadlineExceeded
from ditserve.services.common.metrics import ServiceMetrics
from ditserve.services.common.profiling import Profiler
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.engine import Engine
from ditserve.services.denoiser.job import DenoiseJob, Failed, Finished, Progress

STEP_S = 0.02


@dataclass
class FakeTrajectory:
    steps_done: int = 0
    batched: bool = False

    def result(self) -> int:
        return self.steps_done

    def computed_steps(self) -> dict[str, str]:
        return {}


class FakeRunner:
    """One shape, cost 1; a step takes STEP_S and records which jobs shared it."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def shape_key(self, inputs: object) -> str:
        return "shape"

    def cost(self, inputs: object) -> int:
        return 1

    def start(self, job: DenoiseJob) -> FakeTrajectory:
        return FakeTrajectory()

    def step(self, trajectories: list[FakeTrajectory]) -> list[Exception | None]:
        time.sleep(STEP_S)
        self.batches.append(len(trajectories))
        for trajectory in trajectories:
            trajectory.steps_done += 1
        return [None] * len(trajectories)


def outcome(job: DenoiseJob, timeout_s: float = 10.0) -> Finished | Failed:
    """The job's last event (progress skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = job.events.get(timeout=timeout_s)
        if not isinstance(event, Progress):
            return event
    raise TimeoutError(job.request_id)


def test_running_job_past_its_deadline_ends_and_its_slot_is_reused(tmp_path: Path) -> None:
    metrics = ServiceMetrics("denoiser")
    runner = FakeRunner()
    engine = Engine(runner, metrics, Profiler(tmp_path), BatchingConfig(mode="continuous", max_batch_size=1))
    try:
        doomed = DenoiseJob("doomed", None, steps=1000, deadline=time.monotonic() + 10 * STEP_S)
        waiting = DenoiseJob("waiting", None, steps=3)
        engine.submit(doomed)
        engine.submit(waiting)  # one slot: waits behind the doomed job until its deadline frees the slot
        started = time.monotonic()
        ended = outcome(doomed)
        assert isinstance(ended, Failed) and isinstance(ended.error, DeadlineExceeded)
        assert time.monotonic() - started < 2.0, "the slot must free at the next step, not at the job's end"
        finished = outcome(waiting)
        assert isinstance(finished, Finished) and finished.latents == 3
        assert metrics.registry.get_sample_value("ditserve_deadline_exceeded_total") == 1.0
        assert max(runner.batches) == 1
    finally:
        engine.close()


def test_queued_job_past_its_deadline_never_starts(tmp_path: Path) -> None:
    metrics = ServiceMetrics("denoiser")
    runner = FakeRunner()
    engine = Engine(runner, metrics, Profiler(tmp_path), BatchingConfig(mode="continuous", max_batch_size=1))
    try:
        long = DenoiseJob("long", None, steps=20)
        late = DenoiseJob("late", None, steps=5, deadline=time.monotonic() + 3 * STEP_S)
        engine.submit(long)
        engine.submit(late)
        ended = outcome(late)
        assert isinstance(ended, Failed) and isinstance(ended.error, DeadlineExceeded)
        assert isinstance(outcome(long), Finished)
        assert sum(runner.batches) == 20, "the expired job took no step"
        assert metrics.registry.get_sample_value("ditserve_deadline_exceeded_total") == 1.0
    finally:
        engine.close()


def test_the_engine_runs_without_torch() -> None:
    """What makes the tests above torch-free (tests/unit/test_layering.py checks it in a clean process)."""
    assert "ditserve.services.denoiser.engine" in sys.modules
