"""Assembles the denoiser from its options: family, model, attention backend, SP driver, runner, engine.

Kept apart from the gRPC servicer (service.py), which only parses, runs and answers: everything that can
fail at start-up fails here, as a StartupError naming what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

from ditserve.services.common.device import dtype_name
from ditserve.services.common.errors import InvalidArgument, StartupError
from ditserve.services.common.profiling import add_block_ranges
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser.attention import AttentionBackendUnavailable, resolve_backend
from ditserve.services.denoiser.attention.choice import AttentionShape, AutoTune
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.engine import Engine
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.denoiser.parallel.mesh import SPConfig
from ditserve.services.denoiser.runner import TransformerRunner
from ditserve.services.families import load_family
from ditserve.services.families.family import ModelFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenoiserOptions:
    """The denoiser's command-line choices (services/serve.py)."""

    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(mode="off"))
    attention_backend: str = "auto"
    attention_benchmark: str = "auto"  # how `auto` decides: measure on CUDA (auto), anywhere (on), rules (off)
    attention_cache: Path | None = None  # where `auto` keeps its measured decision (None: choice.cache_path())
    cache: CacheConfig = field(default_factory=CacheConfig)
    progress_interval_ms: float = 50.0
    sequence_parallel: SPConfig = field(default_factory=SPConfig)
    sp_timeout_s: float = 120.0  # a collective inside a call: longer than any rank lags behind another
    compile: bool = False  # --compile: regional torch.compile of the blocks, warmed up before SERVING
    quantize: str = "none"  # --quantize: none, int8-weight or fp8 (torchao), the blocks' Linears
    joint_cfg: str = "batched"  # --joint-cfg: both CFG branches in one call for a batch, or always


@dataclass
class DenoiserRuntime:
    family: ModelFamily
    facts: ModelFacts
    attention_backend: str
    runner: TransformerRunner
    engine: Engine
    default_cache: CacheConfig
    sp: object | None  # an SPDriver when the world is larger than one

    def close(self) -> None:
        self.engine.close()
        if self.sp is not None:
            self.sp.stop()


def build_runtime(stage: StageContext, options: DenoiserOptions) -> DenoiserRuntime:
    folder = stage.folder
    family = load_family(folder)
    transformer = family.load_transformer(folder, stage.device, stage.dtype)
    head_dim = family.attention_head_dim(transformer)
    shape = AttentionShape(
        batch=1,
        tokens=family.attention_tokens(transformer, folder),
        heads=family.attention_heads(transformer),
        head_dim=head_dim,
        dtype=dtype_name(stage.dtype),
    )
    autotune = AutoTune(shape, options.attention_benchmark, options.attention_cache)
    try:
        backend, reason = resolve_backend(options.attention_backend, stage.device, stage.dtype, head_dim, autotune)
    except AttentionBackendUnavailable as error:
        raise StartupError(str(error)) from None
    log.info("attention: %s", reason)
    stage.details["attention"] = reason
    family.apply_attention_backend(transformer, backend)
    optimize_transformer(stage, options, transformer)
    executor = family.executor(transformer)
    facts = ModelFacts.load(folder, family.published_teacache_coefficients, executor.num_blocks)
    try:  # a default the model cannot serve at its default steps stops the start, clearly
        default_cache = accept_cache(facts, options.cache, facts.defaults.steps, "--cache-policy")
    except InvalidArgument as error:
        raise StartupError(str(error)) from None
    sp = None
    if options.sequence_parallel.world_size > 1:
        from ditserve.services.denoiser.parallel.serving import SPDriver  # starts processes: only when asked

        sp = SPDriver.start(
            options.sequence_parallel,
            folder,
            family,
            transformer,
            stage.device,
            stage.dtype,
            backend,
            facts.teacache_coefficients,
            timeout_s=options.sp_timeout_s,
        )
        sp.watch()
        executor = sp.executor
    cache_steps = Counter(
        "ditserve_cache_steps",
        "Transformer passes (per step and CFG branch) of requests with step caching",
        ["policy", "outcome"],
        registry=stage.metrics.registry,
    )
    runner = family.runner(
        transformer,
        executor,
        folder,
        stage.device,
        stage.dtype,
        facts,
        on_cache_step=lambda policy, computed: cache_steps.labels(policy, "computed" if computed else "cached").inc(),
        mirror=sp,
        joint_cfg_alone=options.joint_cfg == "always",
    )
    stage.details["joint_cfg"] = options.joint_cfg
    if options.compile:  # before the engine exists, so health is not SERVING until compiled
        from ditserve.services.denoiser.compile import warm_up

        batch_sizes = (1,) if options.batching.mode == "off" else (1, 2)
        seconds = warm_up(family, transformer, runner, stage.limits, batch_sizes)
        stage.details["compile_warmup_s"] = f"{seconds:.1f}"
    engine = Engine(runner, stage.metrics, stage.profiler, options.batching, stage.compute)
    for prefix, blocks in family.profiled_blocks(transformer).items():
        add_block_ranges(blocks, prefix)
    stage.publish_model_info(attention_backend=backend.value, quantization=options.quantize)
    return DenoiserRuntime(family, facts, backend.value, runner, engine, default_cache, sp)


def optimize_transformer(stage: StageContext, options: DenoiserOptions, transformer: object) -> None:
    """--quantize, then --compile (torchao's tensors compile into fused kernels), noted in Info's details."""
    if options.sequence_parallel.world_size > 1 and (options.compile or options.quantize != "none"):
        raise StartupError(
            "--compile and --quantize are not supported with --sp-ulysses/--sp-ring > 1 yet: the other ranks"
            " load their own transformer unquantized and eager"
        )
    from ditserve.services.denoiser.quantize import quantize_transformer

    quantized = quantize_transformer(transformer, options.quantize, stage.device)
    stage.details["quantize"] = options.quantize
    if quantized:
        log.info("quantize: %s on %d block Linears (torchao)", options.quantize, quantized)
        stage.details["quantized_linears"] = quantized
    if options.compile:
        from ditserve.services.denoiser.compile import compile_blocks

        blocks = compile_blocks(transformer)
        log.info("compile: torch.compile on each of %d repeated blocks (regional)", blocks)
    stage.details["compile"] = "regional" if options.compile else "off"


def accept_cache(facts: ModelFacts, config: CacheConfig, steps: int, field: str) -> CacheConfig:
    """facts.accept with errors named as the caller sent the policy: `cache.dbcache.fn`,
    `--cache-policy.dbcache.fn`."""
    try:
        return facts.accept(config, steps)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}.{error.field.removeprefix('cache.')}", error.reason) from None
