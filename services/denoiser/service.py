"""Denoiser.Denoise: validate, admit to the engine, stream step progress, then the latents."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import grpc
import torch
from prometheus_client import Counter

from ditserve.services.common import flux, tensor_codec
from ditserve.services.common.errors import Cancelled, FailedPrecondition, InvalidArgument, StartupError
from ditserve.services.common.limits import check_generation, check_range
from ditserve.services.common.model import SIDECAR
from ditserve.services.common.profiling import SAFE_NAME, add_block_ranges
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser import job as events
from ditserve.services.denoiser.attention import (
    AttentionBackendUnavailable,
    apply_attention_backend,
    resolve_backend,
)
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.cache.policy import CacheConfig, model_teacache_coefficients
from ditserve.services.denoiser.cache.state import RequestCache
from ditserve.services.denoiser.cache.step_masks import resolve, stored_masks
from ditserve.services.denoiser.cache.wire import cache_config
from ditserve.services.denoiser.engine import Engine
from ditserve.services.denoiser.flux_runner import Conditioning, FluxInputs, FluxRunner
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.parallel.mesh import SPConfig
from ditserve.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc, encoder_pb2

log = logging.getLogger(__name__)

FLOAT_DATATYPES = ("FP32", "FP16", "BF16")


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    role = "denoiser"

    def __init__(
        self,
        stage: StageContext,
        batching: BatchingConfig | None = None,
        attention_backend: str = "auto",
        cache: CacheConfig | None = None,
        progress_interval_ms: float = 50.0,
        sequence_parallel: SPConfig | None = None,
    ) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        folder = stage.folder
        self.transformer = folder.load("transformer", stage.device, stage.dtype)
        head_dim = self.transformer.config.attention_head_dim
        try:
            backend, reason = resolve_backend(attention_backend, stage.device, stage.dtype, head_dim)
        except AttentionBackendUnavailable as error:
            raise StartupError(str(error)) from None
        log.info("attention: %s", reason)
        apply_attention_backend(self.transformer, backend)
        self.attention_backend = backend.value
        try:
            teacache_coefficients = model_teacache_coefficients(folder.family, folder.sidecar)
            self.step_masks = stored_masks(folder.sidecar)
        except (InvalidArgument, ValueError) as error:
            raise StartupError(f"{folder.path / SIDECAR}: {error}") from None
        self.sequence_parallel = sequence_parallel or SPConfig()
        self.sp = None
        if self.sequence_parallel.world_size > 1:
            from ditserve.services.denoiser.parallel.serving import SPDriver  # starts processes: only when asked

            self.sp = SPDriver.start(
                self.sequence_parallel,
                folder,
                self.transformer,
                stage.device,
                stage.dtype,
                backend,
                teacache_coefficients,
            )
        cache_steps = Counter(
            "ditserve_cache_steps",
            "Transformer passes (per step and CFG branch) of requests with step caching",
            ["policy", "outcome"],
            registry=stage.metrics.registry,
        )
        self.runner = FluxRunner(
            self.sp.model if self.sp is not None else self.transformer,
            folder.load("scheduler"),
            flux.vae_scale_factor(folder.config("vae")),
            stage.device,
            stage.dtype,
            teacache_coefficients=teacache_coefficients,
            on_cache_step=lambda policy, computed: cache_steps.labels(
                policy, "computed" if computed else "cached"
            ).inc(),
            executor=self.sp.model.executor if self.sp is not None else None,
            mirror=self.sp,
        )
        self.default_cache = cache or CacheConfig()
        self.progress_interval_s = progress_interval_ms / 1000.0
        try:  # a default the model cannot serve at its default steps stops the start, clearly
            self._accept_cache(self.default_cache, folder.defaults.steps, "--cache-policy")
        except InvalidArgument as error:
            raise StartupError(str(error)) from None
        self.batching = batching or BatchingConfig(mode="off")
        self.engine = Engine(self.runner, stage.metrics, stage.profiler, self.batching)
        add_block_ranges(list(self.transformer.transformer_blocks), "double_block")
        add_block_ranges(list(self.transformer.single_transformer_blocks), "single_block")
        stage.publish_model_info(attention_backend=self.attention_backend)

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.Denoiser"]

    def register(self, server: grpc.Server) -> None:
        denoiser_pb2_grpc.add_DenoiserServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        defaults = self.stage.folder.defaults
        return self.stage.info(
            attention_backend=self.attention_backend,
            default_height=defaults.height,
            default_width=defaults.width,
            default_steps=defaults.steps,
            default_true_cfg_scale=defaults.true_cfg_scale,
            batching=self.batching.mode,
            cache_policy=self.default_cache.mode,
            max_batch_size=self.batching.max_batch_size,
            sequence_parallel=str(self.sequence_parallel),
        )

    def close(self) -> None:
        self.engine.close()
        if self.sp is not None:
            self.sp.stop()

    def _conditioning(self, message: encoder_pb2.PromptEmbedding, field: str) -> Conditioning:
        config = self.transformer.config
        max_abs = self.stage.limits.max_abs_value
        embeds = _float_tensor(message.prompt_embeds, f"{field}.prompt_embeds", max_abs)
        pooled = _float_tensor(message.pooled_prompt_embeds, f"{field}.pooled_prompt_embeds", max_abs)
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != config.joint_attention_dim:
            raise InvalidArgument(
                f"{field}.prompt_embeds",
                f"shape {list(embeds.shape)} is not [1, tokens, {config.joint_attention_dim}]",
            )
        check_range(f"{field}.prompt_embeds.shape[1]", embeds.shape[1], 1, self.stage.limits.max_sequence_length)
        if list(pooled.shape) != [1, config.pooled_projection_dim]:
            raise InvalidArgument(
                f"{field}.pooled_prompt_embeds",
                f"shape {list(pooled.shape)} is not [1, {config.pooled_projection_dim}]",
            )
        return Conditioning(embeds, pooled)

    def _accept_cache(self, config: CacheConfig, steps: int, field: str) -> CacheConfig:
        """The policy with the model's calibrated mask filled in; one the model cannot serve (Fn + Bn too
        deep, no TeaCache coefficients, no calibrated mask for these steps) is refused now."""
        with _named(field):
            config = resolve(config, steps, self.step_masks)
            RequestCache(config, self.runner.executor)
        return config

    def parse(self, request: denoiser_pb2.DenoiseRequest) -> FluxInputs:
        defaults = self.stage.folder.defaults
        if not request.HasField("prompt"):
            raise InvalidArgument("prompt", "is missing: send the encoder's embedding")
        prompt = self._conditioning(request.prompt, "prompt")
        true_cfg = request.true_cfg_scale if request.HasField("true_cfg_scale") else defaults.true_cfg_scale
        guidance = request.guidance_scale if request.HasField("guidance_scale") else defaults.guidance_scale
        steps = request.num_inference_steps or defaults.steps
        if request.HasField("cache"):
            cache = self._accept_cache(cache_config(request.cache), steps, "cache")
        else:  # accepted at start-up; only a calibrated mask depends on the request's steps
            with _named("--cache-policy"):
                cache = resolve(self.default_cache, steps, self.step_masks)
        inputs = FluxInputs(
            prompt=prompt,
            negative=None,
            height=request.height or defaults.height,
            width=request.width or defaults.width,
            steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            seed=request.seed,
            num_images=request.num_images or 1,
            cache=cache,
        )
        check_generation(
            self.stage.limits,
            height=inputs.height,
            width=inputs.width,
            steps=inputs.steps,
            num_images=inputs.num_images,
            true_cfg_scale=true_cfg,
        )
        if self.sp is not None:
            image_tokens = self.runner.image_tokens(inputs.height, inputs.width)
            self.sp.check_tokens(prompt.embeds.shape[1], image_tokens, inputs.height, inputs.width)
        if not (math.isfinite(guidance) and 0.0 <= guidance <= 100.0):
            raise InvalidArgument("guidance_scale", f"{guidance} is outside [0, 100]")
        if true_cfg > 1.0:
            if not request.HasField("negative_prompt"):
                raise InvalidArgument("negative_prompt", "is required when true_cfg_scale > 1")
            negative = self._conditioning(request.negative_prompt, "negative_prompt")
            if negative.embeds.shape != prompt.embeds.shape:
                raise InvalidArgument(
                    "negative_prompt.prompt_embeds",
                    f"shape {list(negative.embeds.shape)} differs from the prompt's {list(prompt.embeds.shape)}",
                )
            inputs = replace(inputs, negative=negative)
        return inputs

    def Denoise(
        self, request: denoiser_pb2.DenoiseRequest, context: grpc.ServicerContext
    ) -> Iterator[denoiser_pb2.DenoiseEvent]:
        self.metrics.count_bytes("in", request.ByteSize())
        if self.sp is not None:
            self.sp.check_available()
        inputs = self.parse(request)
        request_id = request.request_id or uuid.uuid4().hex
        if request.profile_steps:
            check_range("profile_steps", request.profile_steps, 1, inputs.steps)
            if not SAFE_NAME.fullmatch(request_id):
                raise InvalidArgument("request_id", "must be 1-64 of [A-Za-z0-9._-] to name a profile trace")
            if self.profiler.running:
                raise FailedPrecondition("a profile is already running on this denoiser")
        job = DenoiseJob(request_id, inputs, inputs.steps, request.profile_steps)
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

    def _result(self, event: events.Finished, inputs: FluxInputs) -> denoiser_pb2.DenoiseEvent:
        latents = tensor_codec.encode(event.latents)
        self.metrics.count_bytes("out", len(latents.raw_data))
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
            timing=timing,
            profile_trace=event.profile_trace,
        )
        return denoiser_pb2.DenoiseEvent(result=result)


@contextlib.contextmanager
def _named(field: str) -> Iterator[None]:
    """Cache-policy errors named as the caller sent the policy: `cache.dbcache.fn`, `--cache-policy.dbcache.fn`."""
    try:
        yield
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}.{error.field.removeprefix('cache.')}", error.reason) from None


def _float_tensor(message: object, field: str, max_abs: float) -> torch.Tensor:
    if message.datatype not in FLOAT_DATATYPES:
        raise InvalidArgument(f"{field}.datatype", f"{message.datatype!r} is not one of {', '.join(FLOAT_DATATYPES)}")
    tensor = tensor_codec.decode(message, field)
    tensor_codec.check_values(tensor, field, max_abs)
    return tensor
