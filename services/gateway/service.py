"""Pipeline.Generate: encode -> denoise -> decode over gRPC, streaming progress.

Stateless and weightless: it validates early (before spending an encode),
forwards the caller's deadline to every stage, and cancels the stage call in
flight when its caller goes away. Its health is the truth about its stages:
NOT_SERVING while any stage has no serving replica (Admin.Info says which).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge, Histogram

import ditserve
from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.services.common.errors import ServiceError
from ditserve.services.common.limits import RequestLimits, check_prompt, check_range, check_size
from ditserve.services.common.metrics import LATENCY_BUCKETS, ServiceMetrics
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.timing import elapsed_ms
from ditserve.services.gateway.pool import POLL_SETTLE_S, StageChannel, StageError
from ditserve.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    pipeline_pb2,
    pipeline_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)

HEALTH_POLL_S = 0.2
# At start-up the first health report waits this long for the stages to connect: stages that are up
# make the gateway SERVING from its first answer, not a moment later.
STARTUP_WAIT_S = 2.0


@dataclass(frozen=True)
class GatewayConfig:
    """Each stage is one gRPC target (see pool.stage_target): `dns:///name:port`, `host:port`, IP
    addresses (comma-separated, or a list)."""

    encoders: str | list[str]
    denoisers: str | list[str]
    vaes: str | list[str]
    limits: RequestLimits
    stage_timeout_s: float = 600.0
    max_message_mb: int = 256
    security: ClientSecurity = NO_SECURITY


class CallTracker:
    """Remembers the stage calls of one request so they can be cancelled together."""

    def __init__(self) -> None:
        self._calls: list[grpc.Future] = []
        self._lock = threading.Lock()

    def track(self, call: grpc.Future) -> grpc.Future:
        with self._lock:
            self._calls.append(call)
        return call

    def cancel_all(self) -> None:
        with self._lock:
            for call in self._calls:
                call.cancel()


def _progress(stage: str, started: float, step: int = 0, total: int = 0) -> pipeline_pb2.GenerateEvent:
    return pipeline_pb2.GenerateEvent(
        progress=pipeline_pb2.Progress(stage=stage, step=step, total_steps=total, elapsed_ms=elapsed_ms(started))
    )


class DenoiserDefaults:
    """Which request field is the model's classic-CFG scale, and its default, asked once by Admin.Info.

    The gateway holds no model, yet must know whether a request needs its negative prompt encoded:
    FLUX guides with true_cfg_scale (the shipped model by default), Wan with guidance_scale.
    """

    def __init__(self, pool: StageChannel) -> None:
        self._pool = pool
        self._cfg: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def uses_cfg(self, request: pipeline_pb2.GenerateRequest, timeout: float) -> bool:
        with self._lock:
            if self._cfg is None:
                details = self._pool.info(timeout).details
                field = details.get("cfg_scale_field", "true_cfg_scale")
                self._cfg = (field, float(details.get("default_cfg_scale", "1.0")))
        field, default = self._cfg
        return (getattr(request, field) if request.HasField(field) else default) > 1.0


class StageMetrics:
    """What the gateway sees of each stage: call latency and outcome, and whether a replica serves.
    (Retries are gRPC's and invisible here; each stage counts the retried calls it receives.)"""

    def __init__(self, metrics: ServiceMetrics) -> None:
        registry = metrics.registry
        self.duration = Histogram(
            "ditserve_gateway_stage_duration_seconds",
            "Stage call wall time seen by the gateway, retries included",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.calls = Counter(
            "ditserve_gateway_stage_calls", "Stage calls by final status", ["stage", "code"], registry=registry
        )
        self.serving = Gauge(
            "ditserve_gateway_stage_serving",
            "1 while at least one replica of the stage is connected and SERVING",
            ["stage"],
            registry=registry,
        )

    @contextlib.contextmanager
    def observe(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except grpc.RpcError as error:
            code = error.code()
            raise StageError(stage, error) from None
        except GeneratorExit:  # the caller went away mid-stream; CallTracker cancelled the call
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.duration.labels(stage).observe(time.perf_counter() - started)
            self.calls.labels(stage, code.name).inc()


class GatewayService(pipeline_pb2_grpc.PipelineServicer):
    role = "gateway"

    def __init__(self, config: GatewayConfig, profiler: Profiler, metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        self.profiler = profiler
        self.metrics = metrics or ServiceMetrics(self.role)
        self.stage_metrics = StageMetrics(self.metrics)

        self._changed = threading.Event()  # a stage channel changed state: look again now

        def stage(name: str, address: str | list[str], stub_class: Callable[[grpc.Channel], object]) -> StageChannel:
            address = address if isinstance(address, str) else ",".join(address)
            return StageChannel(name, address, stub_class, config.max_message_mb, config.security, self._changed.set)

        self.encoder = stage("encoder", config.encoders, encoder_pb2_grpc.TextEncoderStub)
        self.denoiser = stage("denoiser", config.denoisers, denoiser_pb2_grpc.DenoiserStub)
        self.vae = stage("vae", config.vaes, vae_pb2_grpc.VaeDecoderStub)
        self.stages = (self.encoder, self.denoiser, self.vae)
        self.denoiser_defaults = DenoiserDefaults(self.denoiser)
        self.metrics.set_model_info(model="", dtype="", device="", attention_backend="", version=ditserve.__version__)
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def not_serving(self) -> list[str]:
        """The stages with no serving replica right now."""
        missing = []
        for stage in self.stages:
            serving = stage.serving()
            self.stage_metrics.serving.labels(stage.stage).set(int(serving))
            if not serving:
                missing.append(stage.stage)
        return missing

    def watch_health(self, report: Callable[[bool, str], None]) -> None:
        """Reports NOT_SERVING, naming the stages, while any stage has no serving replica; SERVING once all do.
        A probe or a load balancer in front of the gateway then sends no work that could only fail."""
        deadline = time.monotonic() + STARTUP_WAIT_S
        while (missing := self.not_serving()) and time.monotonic() < deadline:
            self._changed.wait(HEALTH_POLL_S)
            self._changed.clear()
        report(not missing, self._why(missing))

        def watch() -> None:
            last = missing
            while not self._closed.is_set():
                self._changed.wait(HEALTH_POLL_S)  # a change, or the next look at the down-for grace
                self._changed.clear()
                now = self.not_serving()
                if now != last:
                    report(not now, self._why(now))
                    last = now

        self._watcher = threading.Thread(target=watch, name="gateway-health", daemon=True)
        self._watcher.start()

    def _why(self, missing: list[str]) -> str:
        stages = {stage.stage: stage for stage in self.stages}
        return "; ".join(f"{name}: no serving replica at {stages[name].target}" for name in missing)

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.Pipeline"]

    def register(self, server: grpc.Server) -> None:
        pipeline_pb2_grpc.add_PipelineServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        """Each stage's target and channel state, and `not_serving`: the stages without a serving replica."""
        details = {"not_serving": ",".join(self.not_serving())}
        for stage in self.stages:
            details[f"{stage.stage}_target"] = stage.target
            details[f"{stage.stage}_state"] = stage.state.name
        return common_pb2.InfoResponse(service=self.role, version=ditserve.__version__, details=details)

    def close(self) -> None:
        self._closed.set()
        for stage in self.stages:
            stage.stop_watching()
        time.sleep(POLL_SETTLE_S)
        for stage in self.stages:
            stage.close()

    def _validate(self, request: pipeline_pb2.GenerateRequest) -> None:
        """Checks what the gateway can know; stages check the values they resolve from defaults."""
        limits = self.config.limits
        check_prompt("prompt", request.prompt, limits)
        check_prompt("negative_prompt", request.negative_prompt, limits, allow_empty=True)
        for field in ("width", "height"):
            if getattr(request, field):
                check_size(field, getattr(request, field), limits)
        if request.num_inference_steps:
            check_range("num_inference_steps", request.num_inference_steps, 1, limits.max_steps)
        if request.num_images:
            check_range("num_images", request.num_images, 1, limits.max_num_images)
        if request.max_sequence_length:
            check_range("max_sequence_length", request.max_sequence_length, 1, limits.max_sequence_length)
        if request.quality:
            check_range("quality", request.quality, 1, 100)
        if request.num_frames:
            check_range("num_frames", request.num_frames, 1, limits.max_frames)

    def _timeout(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.config.stage_timeout_s if remaining is None else min(remaining, self.config.stage_timeout_s)

    def _call(
        self, stage: StageChannel, method: str, message: object, context: grpc.ServicerContext, calls: CallTracker
    ) -> object:
        """A unary stage call under the caller's deadline, cancelled with the caller."""
        with self.stage_metrics.observe(stage.stage):
            return calls.track(getattr(stage.stub, method).future(message, timeout=self._timeout(context))).result()

    @staticmethod
    def _denoise_request(
        request: pipeline_pb2.GenerateRequest,
        encoded: encoder_pb2.EncodeResponse,
        request_id: str,
        seed: int,
    ) -> denoiser_pb2.DenoiseRequest:
        """The request's own settings; what it leaves unset the denoiser resolves from the model's defaults."""
        message = denoiser_pb2.DenoiseRequest(
            request_id=request_id,
            prompt=encoded.embeddings[0],
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.num_inference_steps,
            seed=seed,
            num_images=request.num_images,
            profile_steps=request.profile_steps,
        )
        for field in ("guidance_scale", "true_cfg_scale"):
            if request.HasField(field):
                setattr(message, field, getattr(request, field))
        if request.HasField("cache"):
            message.cache.CopyFrom(request.cache)
        if len(encoded.embeddings) > 1:  # CFG: the negative prompt was encoded second
            message.negative_prompt.CopyFrom(encoded.embeddings[1])
        return message

    def Generate(
        self, request: pipeline_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pipeline_pb2.GenerateEvent]:
        started = time.perf_counter()
        self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        calls = CallTracker()
        context.add_callback(calls.cancel_all)
        true_cfg = self.denoiser_defaults.uses_cfg(request, self._timeout(context))
        stage_ms: dict[str, float] = {}

        t0 = time.perf_counter()
        encode_request = encoder_pb2.EncodeRequest(
            prompts=[request.prompt, request.negative_prompt] if true_cfg else [request.prompt],
            max_sequence_length=request.max_sequence_length,
            allow_empty=true_cfg,
        )
        encoded = self._call(self.encoder, "Encode", encode_request, context, calls)
        stage_ms["encode"] = elapsed_ms(t0)
        yield _progress("encode", started)

        t0 = time.perf_counter()
        denoise_request = self._denoise_request(request, encoded, request_id, seed)
        result: denoiser_pb2.DenoiseResult | None = None
        with self.stage_metrics.observe("denoiser"):
            stream = calls.track(self.denoiser.stub.Denoise(denoise_request, timeout=self._timeout(context)))
            for event in stream:
                if event.HasField("progress"):
                    yield _progress("denoise", started, event.progress.step, event.progress.total_steps)
                else:
                    result = event.result
        if result is None:
            raise ServiceError("denoiser: the stream ended without a result")
        stage_ms["denoise"] = elapsed_ms(t0)

        t0 = time.perf_counter()
        decode_request = vae_pb2.DecodeRequest(
            latents=result.latents,
            height=result.height,
            width=result.width,
            format=request.output_format,
            quality=request.quality,
            num_frames=result.num_frames,
            fps=request.fps,
            video_format=request.video_format,
            batched=result.batched,
        )
        decoded = self._call(self.vae, "Decode", decode_request, context, calls)
        stage_ms["decode"] = elapsed_ms(t0)
        yield _progress("decode", started)

        total = elapsed_ms(started)
        timing = common_pb2.Timing(
            queue_ms=encoded.timing.queue_ms + result.timing.queue_ms + decoded.timing.queue_ms,
            stage_ms={**stage_ms, "gateway": total - sum(stage_ms.values())},
            step_ms=result.timing.step_ms,
            total_ms=total,
            computed_steps=result.timing.computed_steps,
        )
        yield pipeline_pb2.GenerateEvent(
            result=pipeline_pb2.GenerateResult(
                images=decoded.images,
                videos=decoded.videos,
                timing=timing,
                seed=seed,
                request_id=request_id,
                profile_trace=result.profile_trace,
            )
        )
