"""The denoiser's engine loop: the stage's compute thread runs it and owns the model; the pure scheduler decides.

Handlers never touch the transformer: they submit a job and read its events.
Each iteration is vLLM's shape: `schedule()` -> run one step for the planned
batch -> `update_from_output()`. The queue is bounded (RESOURCE_EXHAUSTED), a
cancelled job leaves at the next step boundary, and a job that fails takes
nobody else with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from ditserve.services.common.compute import ComputeThread
from ditserve.services.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from ditserve.services.common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServiceMetrics
from ditserve.services.common.profiling import Profiler, trace_range
from ditserve.services.denoiser.batching import (
    BatchingConfig,
    BatchScheduler,
    QueueFull,
    ScheduledRequest,
    StepOutput,
    StepPlan,
)
from ditserve.services.denoiser.job import DenoiseJob, Failed, Finished, Progress

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Trajectory(Protocol):
    """A job's denoising state, advanced one step at a time by the runner."""

    def result(self) -> object: ...

    def computed_steps(self) -> dict[str, str]: ...


class Runner(Protocol):
    """Model-family code (denoiser/runner.py): what may share a batch, and how a batch takes one step."""

    def shape_key(self, inputs: Any) -> Hashable:
        """What must match to share a transformer call; the batching mode adds what it needs."""
        ...

    def cost(self, inputs: Any) -> int: ...

    def start(self, job: DenoiseJob) -> Trajectory: ...

    def step(self, trajectories: list[Trajectory]) -> list[Exception | None]:
        """Advances every trajectory one step; returns, per trajectory, the error that failed it."""
        ...


@dataclass
class _Run:
    """A job the scheduler admitted: its trajectory and timings."""

    job: DenoiseJob
    trajectory: Trajectory | None = None
    started: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    trace: str = ""


class Engine:
    def __init__(
        self,
        runner: Runner,
        metrics: ServiceMetrics,
        profiler: Profiler,
        config: BatchingConfig,
        compute: ComputeThread | None = None,
    ) -> None:
        """compute: the stage's compute thread, which the engine's loop then owns (its own thread if None)."""
        self.runner = runner
        self.profiler = profiler
        self.config = config
        self.scheduler = BatchScheduler(config)
        self._runs: dict[str, _Run] = {}
        self._condition = threading.Condition()
        self._accepting = True
        registry = metrics.registry
        self.queue_depth = Gauge("ditserve_queue_depth", "Jobs waiting for the worker", registry=registry)
        self.running = Gauge("ditserve_running_requests", "Jobs in the running batch", registry=registry)
        self.queue_seconds = Histogram(
            "ditserve_queue_duration_seconds",
            "Wait before a job starts",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            "ditserve_denoise_step_duration_seconds",
            "One denoising step",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "ditserve_batch_size",
            "Requests in a batch when admission stops, by why it stopped",
            ["stop_reason"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.deadline_exceeded = Counter(
            "ditserve_deadline_exceeded",
            "Jobs ended by their caller's deadline, waiting or running",
            registry=registry,
        )
        self._own_thread = compute is None
        self._compute = compute or ComputeThread("denoiser-engine")
        self._worker = self._compute.own(self._loop)

    def submit(self, job: DenoiseJob) -> None:
        request = ScheduledRequest(
            request_id=job.request_id,
            key=self.config.batch_key(self.runner.shape_key(job.inputs), job.steps),
            cost=self.runner.cost(job.inputs),
            total_steps=job.steps,
            arrival=time.monotonic(),
            deadline=job.deadline,
        )
        with self._condition:
            if not self._accepting:
                raise Unavailable("the denoiser is shutting down")
            if job.request_id in self._runs:
                raise ResourceExhausted(f"request_id {job.request_id!r} is already running here")
            try:
                self.scheduler.add(request, request.arrival)
            except QueueFull as error:
                raise ResourceExhausted(str(error)) from None
            self._runs[job.request_id] = _Run(job)
            self.queue_depth.set(self.scheduler.num_waiting)
            self._condition.notify()

    def cancel(self, job: DenoiseJob) -> None:
        """The caller went away: the job leaves the queue or its batch at the next step boundary."""
        job.cancel()
        with self._condition:
            if self.scheduler.cancel(job.request_id):
                if job.deadline is not None and time.monotonic() >= job.deadline:
                    self.deadline_exceeded.inc()  # gRPC ended the call at its deadline before the scheduler did
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._accepting = False
            self._condition.notify()
        futures.wait([self._worker], timeout=10)
        if self._own_thread:
            self._compute.close()

    def _next_plan(self) -> StepPlan | None:
        """Blocks until a step can run; None once closed and idle."""
        with self._condition:
            while True:
                plan = self.scheduler.schedule(time.monotonic())
                if plan is not None:
                    self._forget(plan)
                    if plan.request_ids:
                        self.queue_depth.set(self.scheduler.num_waiting)
                        self.running.set(len(plan.request_ids))
                        return plan
                elif not self._accepting:
                    return None
                self.running.set(0)
                self._condition.wait(timeout=plan.wait_s if plan is not None else None)

    def _forget(self, plan: StepPlan) -> None:
        for request_id in plan.cancelled:
            run = self._runs.pop(request_id, None)
            if run is not None:
                log.info("request %s cancelled after %d/%d steps", request_id, len(run.step_ms), run.job.steps)
                self._release_profiler(run)
        for request_id in plan.expired:
            run = self._runs.pop(request_id, None)
            if run is not None:
                self.deadline_exceeded.inc()
                log.info("request %s: deadline passed after %d/%d steps", request_id, len(run.step_ms), run.job.steps)
                self._release_profiler(run)
                run.job.emit(Failed(DeadlineExceeded("the request's deadline passed before it finished")))

    def _loop(self) -> None:
        while (plan := self._next_plan()) is not None:
            failed = self._step(plan)
            with self._condition:
                finished = self.scheduler.update_from_output(plan, StepOutput(failed=failed))
            for request_id in finished:
                self._finish(self._runs.pop(request_id))

    def _start(self, run: _Run) -> None:
        run.started = time.perf_counter()
        self.queue_seconds.observe(run.started - run.job.submitted)
        if run.job.profile_steps:
            self.profiler.start(f"request-{run.job.request_id}")
        run.trajectory = self.runner.start(run.job)

    def _step(self, plan: StepPlan) -> list[str]:
        """Runs one step of the planned batch; returns the ids that failed (each fails alone)."""
        failed: list[str] = []
        for request_id in plan.joined:
            try:
                self._start(self._runs[request_id])
            except Exception as error:
                failed.append(request_id)
                self._fail(request_id, error)
        if plan.stop_reason is not None:
            self.batch_size.labels(plan.stop_reason).observe(len(plan.request_ids))
        batch = [request_id for request_id in plan.request_ids if request_id not in failed]
        if not batch:
            return failed
        started = time.perf_counter()
        with trace_range("denoise_step"):
            errors = self.runner.step([self._runs[request_id].trajectory for request_id in batch])
        seconds = time.perf_counter() - started
        self.step_seconds.observe(seconds)
        for request_id, error in zip(batch, errors, strict=True):
            if error is not None:
                failed.append(request_id)
                self._fail(request_id, error)
                continue
            run = self._runs[request_id]
            run.step_ms.append(seconds * 1000.0)
            done = len(run.step_ms)
            if done == run.job.profile_steps:
                run.trace = str(self.profiler.stop())
            run.job.emit(Progress(done, run.job.steps, seconds * 1000.0))
        return failed

    def _fail(self, request_id: str, error: Exception) -> None:
        run = self._runs.pop(request_id)
        if not isinstance(error, ServiceError):
            log.error("request %s failed: %s: %s", request_id, type(error).__name__, error)
        self._release_profiler(run)
        run.job.emit(Failed(error))

    def _release_profiler(self, run: _Run) -> None:
        """A job that ends mid-profile still hands the profiler back."""
        if run.job.profile_steps and not run.trace and run.started and self.profiler.running:
            self.profiler.stop()

    def _finish(self, run: _Run) -> None:
        latents = run.trajectory.result()
        queue_ms = (run.started - run.job.submitted) * 1000.0
        total_ms = (time.perf_counter() - run.job.submitted) * 1000.0
        computed = run.trajectory.computed_steps()
        run.job.emit(Finished(latents, queue_ms, run.step_ms, total_ms, run.trace, computed, run.trajectory.batched))
