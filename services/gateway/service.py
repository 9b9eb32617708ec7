"""Pipeline.Generate: encode -> denoise -> decode over gRPC, streaming progress.

Stateless and weightless: it validates early (before spending an encode),
forwards the caller's deadline to every stage, and cancels the stage call in
flight when its caller goes away.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

import ditserve
from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.services.common.errors import ServiceError
from ditserve.services.common.limits import RequestLimits, check_prompt, check_range, check_size
from ditserve.services.common.metrics import ServiceMetrics
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.server import channel_options
from ditserve.services.common.timing import elapsed_ms
from ditserve.services.gateway.pool import StagePool
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

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class GatewayConfig:
    encoders: list[str]
    denoisers: list[str]
    vaes: list[str]
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
    """The denoiser's default true CFG scale, asked once by Admin.Info.

    The gateway holds no model, yet must know whether a request that leaves true_cfg_scale unset
    needs its negative prompt encoded (the shipped model guides with true CFG by default).
    """

    def __init__(self, pool: StagePool) -> None:
        self._pool = pool
        self._true_cfg_scale: float | None = None
        self._lock = threading.Lock()

    def true_cfg_scale(self, timeout: float) -> float:
        with self._lock:
            if self._true_cfg_scale is None:
                details = self._pool.info(timeout).details
                self._true_cfg_scale = float(details.get("default_true_cfg_scale", "1.0"))
            return self._true_cfg_scale


class GatewayService(pipeline_pb2_grpc.PipelineServicer):
    role = "gateway"

    def __init__(self, config: GatewayConfig, profiler: Profiler, metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        self.profiler = profiler
        self.metrics = metrics or ServiceMetrics(self.role)
        # Short reconnect backoff: a restarted stage is used again within a second or two, not minutes.
        options = [*channel_options(config.max_message_mb), *RECONNECT_OPTIONS]
        pool = functools.partial(StagePool, options=options, security=config.security)
        self.encoder = pool("encoder", config.encoders, encoder_pb2_grpc.TextEncoderStub)
        self.denoiser = pool("denoiser", config.denoisers, denoiser_pb2_grpc.DenoiserStub)
        self.vae = pool("vae", config.vaes, vae_pb2_grpc.VaeDecoderStub)
        self.denoiser_defaults = DenoiserDefaults(self.denoiser)
        self.metrics.set_model_info(model="", dtype="", device="", attention_backend="", version=ditserve.__version__)

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.Pipeline"]

    def register(self, server: grpc.Server) -> None:
        pipeline_pb2_grpc.add_PipelineServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        stages = {"encoders": self.encoder, "denoisers": self.denoiser, "vaes": self.vae}
        return common_pb2.InfoResponse(
            service=self.role,
            version=ditserve.__version__,
            details={name: ",".join(pool.addresses) for name, pool in stages.items()},
        )

    def close(self) -> None:
        for pool in (self.encoder, self.denoiser, self.vae):
            pool.close()

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

    def _timeout(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.config.stage_timeout_s if remaining is None else min(remaining, self.config.stage_timeout_s)

    def _call(
        self, pool: StagePool, method: str, message: object, context: grpc.ServicerContext, calls: CallTracker
    ) -> object:
        """A unary stage call under the caller's deadline, cancelled with the caller."""
        return pool.call(
            lambda stub: calls.track(getattr(stub, method).future(message, timeout=self._timeout(context))).result()
        )

    @staticmethod
    def _denoise_request(
        request: pipeline_pb2.GenerateRequest,
        encoded: encoder_pb2.EncodeResponse,
        request_id: str,
        seed: int,
        true_cfg_scale: float,
    ) -> denoiser_pb2.DenoiseRequest:
        message = denoiser_pb2.DenoiseRequest(
            request_id=request_id,
            prompt=encoded.embeddings[0],
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            seed=seed,
            num_images=request.num_images,
            profile_steps=request.profile_steps,
            true_cfg_scale=true_cfg_scale,
        )
        if request.HasField("guidance_scale"):
            message.guidance_scale = request.guidance_scale
        if request.HasField("cache"):
            message.cache.CopyFrom(request.cache)
        if len(encoded.embeddings) > 1:  # true CFG: the negative prompt was encoded second
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
        true_cfg_scale = (
            request.true_cfg_scale
            if request.HasField("true_cfg_scale")
            else self.denoiser_defaults.true_cfg_scale(self._timeout(context))
        )
        true_cfg = true_cfg_scale > 1.0
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
        denoise_request = self._denoise_request(request, encoded, request_id, seed, true_cfg_scale)
        result: denoiser_pb2.DenoiseResult | None = None
        for event in self.denoiser.stream(
            lambda stub: calls.track(stub.Denoise(denoise_request, timeout=self._timeout(context)))
        ):
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
                timing=timing,
                seed=seed,
                request_id=request_id,
                profile_trace=result.profile_trace,
            )
        )
