"""Denoiser.Denoise: parse, admit to the engine, stream step progress, then the latents.

The servicer only parses, runs and answers; runtime.py assembles what it runs on.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import Gauge

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from ditserve.services.common.limits import check_range
from ditserve.services.common.profiling import SAFE_NAME
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser import job as events
from ditserve.services.denoiser.cache.step_masks import describe_masks
from ditserve.services.denoiser.cache.wire import cache_config
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.requests import request_steps
from ditserve.services.denoiser.runtime import DenoiserOptions, accept_cache, build_runtime
from ditserve.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

log = logging.getLogger(__name__)


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    role = "denoiser"

    def __init__(self, stage: StageContext, options: DenoiserOptions | None = None) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        self.options = options or DenoiserOptions()
        self.runtime = build_runtime(stage, self.options)
        self.engine = self.runtime.engine
        self.progress_interval_s = self.options.progress_interval_ms / 1000.0

    def watch_health(self, report: Callable[[bool, str], None]) -> None:
        """SERVING once built; NOT_SERVING, with the reason in the log and a metric, when a
        sequence-parallel group breaks (every request would fail until the denoiser restarts)."""
        report(True, "")
        sp = self.runtime.sp
        if sp is None:
            return
        group_up = Gauge(
            "ditserve_sequence_parallel_up",
            "1 while the sequence-parallel group serves, 0 once it broke (restart the denoiser)",
            registry=self.metrics.registry,
        )
        group_up.set(1)

        def broken(why: str) -> None:
            group_up.set(0)
            report(False, f"sequence-parallel group broken: {why}")

        sp.on_broken = broken
        if sp.broken is not None:
            broken(sp.broken)

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.Denoiser"]

    def register(self, server: grpc.Server) -> None:
        denoiser_pb2_grpc.add_DenoiserServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        defaults = self.runtime.facts.defaults
        return self.stage.info(
            attention_backend=self.runtime.attention_backend,
            family=self.runtime.family.name,
            default_height=defaults.height,
            default_width=defaults.width,
            default_steps=defaults.steps,
            default_true_cfg_scale=defaults.true_cfg_scale,
            cfg_scale_field=self.runtime.family.cfg_scale_field,
            default_cfg_scale=getattr(defaults, self.runtime.family.cfg_scale_field),
            default_num_frames=defaults.num_frames,
            default_fps=defaults.fps,
            temporal_factor=self.runtime.runner.temporal_factor,
            video=self.runtime.family.video,
            batching=self.options.batching.mode,
            cache_policy=self.runtime.default_cache.mode,
            max_batch_size=self.options.batching.max_batch_size,
            sequence_parallel=str(self.options.sequence_parallel),
            step_masks=describe_masks(self.runtime.facts.step_masks, self.runtime.facts.mask_orders),
        )

    def close(self) -> None:
        self.runtime.close()

    def parse(self, request: denoiser_pb2.DenoiseRequest) -> object:
        """The family's validated inputs, with the request's cache policy (else the default) accepted."""
        runner = self.runtime.runner
        steps = request_steps(request, self.runtime.facts.defaults)
        if request.HasField("cache"):
            cache = accept_cache(self.runtime.facts, cache_config(request.cache), steps, "cache")
        else:  # accepted at start-up; only a calibrated mask depends on the request's steps
            cache = accept_cache(self.runtime.facts, self.options.cache, steps, "--cache-policy")
        inputs = runner.parse(request, cache, self.stage.limits)
        if self.runtime.sp is not None:
            self.runtime.sp.check_tokens(runner.token_counts(inputs), f"{inputs.height}x{inputs.width}")
        return inputs

    def Denoise(
        self, request: denoiser_pb2.DenoiseRequest, context: grpc.ServicerContext
    ) -> Iterator[denoiser_pb2.DenoiseEvent]:
        self.metrics.count_bytes("in", request.ByteSize())
        if self.runtime.sp is not None:
            self.runtime.sp.check_available()
        inputs = self.parse(request)
        request_id = request.request_id or uuid.uuid4().hex
        if request.profile_steps:
            check_range("profile_steps", request.profile_steps, 1, inputs.steps)
            if not SAFE_NAME.fullmatch(request_id):
                raise InvalidArgument("request_id", "must be 1-64 of [A-Za-z0-9._-] to name a profile trace")
            if self.profiler.running:
                raise FailedPrecondition("a profile is already running on this denoiser")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        job = DenoiseJob(request_id, inputs, inputs.steps, request.profile_steps, deadline=deadline)
        context.add_callback(lambda: self.engine.cancel(job))
        self.engine.submit(job)
        last_progress = 0.0
        while True:
            event = job.events.get()
            if isinstance(event, events.Progress):
                # Steps of a few ms would otherwise cost a message each on two hops; the last step
                # always goes out, so progress still ends at total_steps.
                now = time.monotonic()
                if now - last_progress < self.progress_interval_s and event.step < event.total_steps:
                    continue
                last_progress = now
                yield denoiser_pb2.DenoiseEvent(
                    progress=denoiser_pb2.StepProgress(
                        step=event.step, total_steps=event.total_steps, step_ms=event.step_ms
                    )
                )
            elif isinstance(event, events.Finished):
                yield self._result(event, inputs)
                return
            elif isinstance(event, events.Failed):
                raise event.error
            else:
                raise Cancelled("the caller cancelled or its deadline passed")

    def _result(self, event: events.Finished, inputs: object) -> denoiser_pb2.DenoiseEvent:
        latents = tensor_codec.encode(event.latents)
        self.metrics.count_bytes("out", latents.ByteSize())  # not len(raw_data): a read copies it
        denoise_ms = event.total_ms - event.queue_ms
        timing = common_pb2.Timing(
            computed_steps=event.computed_steps,
            queue_ms=event.queue_ms,
            stage_ms={"denoise": denoise_ms},
            step_ms=event.step_ms,
            total_ms=event.total_ms,
        )
        result = denoiser_pb2.DenoiseResult(
            latents=latents,
            height=inputs.height,
            width=inputs.width,
            num_frames=inputs.num_frames,
            timing=timing,
            profile_trace=event.profile_trace,
            batched=event.batched,
        )
        return denoiser_pb2.DenoiseEvent(result=result)
