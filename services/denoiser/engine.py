"""The denoiser's engine loop: one worker thread owns the model and runs admitted jobs.

Handlers never touch the transformer: they submit a job and read its events.
A bounded queue gives back-pressure (RESOURCE_EXHAUSTED), and a cancelled job
leaves at the next step boundary so the worker never computes for nobody.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Protocol

from prometheus_client import Gauge, Histogram

from ditserve.services.common.errors import ResourceExhausted, Unavailable
from ditserve.services.common.metrics import LATENCY_BUCKETS, ServiceMetrics
from ditserve.services.common.profiling import Profiler, trace_range
from ditserve.services.denoiser.job import DenoiseJob, Failed, Finished, Progress

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Trajectory(Protocol):
    """A job's denoising state, advanced one step at a time by the runner."""

    def step(self) -> None: ...

    def result(self) -> object: ...


class Runner(Protocol):
    def start(self, job: DenoiseJob) -> Trajectory: ...


class Engine:
    def __init__(self, runner: Runner, metrics: ServiceMetrics, profiler: Profiler, max_queue: int) -> None:
        self.runner = runner
        self.metrics = metrics
        self.profiler = profiler
        self._queue: queue.Queue[DenoiseJob | None] = queue.Queue(maxsize=max_queue)
        self._accepting = True
        registry = metrics.registry
        self.queue_depth = Gauge("ditserve_queue_depth", "Jobs waiting for the worker", registry=registry)
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
        self._worker = threading.Thread(target=self._loop, name="denoiser-engine", daemon=True)
        self._worker.start()

    def submit(self, job: DenoiseJob) -> None:
        if not self._accepting:
            raise Unavailable("the denoiser is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"denoiser queue is full ({self._queue.maxsize} waiting); retry later or add replicas"
            ) from None
        self.queue_depth.set(self._queue.qsize())

    def close(self) -> None:
        self._accepting = False
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self.queue_depth.set(self._queue.qsize())
            self._run(job)

    def _run(self, job: DenoiseJob) -> None:
        started = time.perf_counter()
        queue_ms = (started - job.submitted) * 1000.0
        self.queue_seconds.observe(queue_ms / 1000.0)
        step_ms: list[float] = []
        trace = ""
        profile_until = min(job.profile_steps, job.steps)
        try:
            if profile_until:
                self.profiler.start(f"request-{job.request_id}")
            with trace_range("denoise"):
                trajectory = self.runner.start(job)
                for index in range(job.steps):
                    if job.cancelled:
                        log.info("request %s cancelled after %d/%d steps", job.request_id, index, job.steps)
                        return
                    step_started = time.perf_counter()
                    with trace_range("denoise_step"):
                        trajectory.step()
                    seconds = time.perf_counter() - step_started
                    self.step_seconds.observe(seconds)
                    step_ms.append(seconds * 1000.0)
                    if index + 1 == profile_until:
                        trace = str(self.profiler.stop())
                    job.emit(Progress(index + 1, job.steps, step_ms[-1]))
                latents = trajectory.result()
        except Exception as error:  # one request fails alone; the worker lives on
            log.exception("request %s failed", job.request_id)
            job.emit(Failed(error))
            return
        finally:
            if profile_until and not trace and self.profiler.running:
                self.profiler.stop()  # cancelled or failed mid-profile: still release the profiler
        total_ms = (time.perf_counter() - job.submitted) * 1000.0
        job.emit(Finished(latents, queue_ms, step_ms, total_ms, trace))
