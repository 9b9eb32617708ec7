"""Assembles the denoiser from its options: family, model, attention backend, SP driver, runner, engine.

Kept apart from the gRPC servicer (service.py), which only parses, runs and answers: everything that can
fail at start-up fails here, as a StartupError naming what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import Counter

from ditserve.services.common.errors import InvalidArgument, StartupError
from ditserve.services.common.profiling import add_block_ranges
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser.attention import AttentionBackendUnavailable, resolve_backend
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.engine import Engine
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.denoiser.parallel.mesh import SPConfig
from ditserve.services.denoiser.runner import TransformerRunner
from ditserve.services.families import load_family
from ditserve.services.families.base import ModelFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenoiserOptions:
    """The denoiser's command-line choices (services/serve.py)."""

    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(mode="off"))
    attention_backend: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    progress_interval_ms: float = 50.0
    sequence_parallel: SPConfig = field(default_factory=SPConfig)


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
    try:
        backend, reason = resolve_backend(
            options.attention_backend, stage.device, stage.dtype, family.attention_head_dim(transformer)
        )
    except AttentionBackendUnavailable as error:
        raise StartupError(str(error)) from None
    log.info("attention: %s", reason)
    family.apply_attention_backend(transformer, backend)
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
        )
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
    )
    engine = Engine(runner, stage.metrics, stage.profiler, options.batching)
    for prefix, blocks in family.profiled_blocks(transformer).items():
        add_block_ranges(blocks, prefix)
    stage.publish_model_info(attention_backend=backend.value)
    return DenoiserRuntime(family, facts, backend.value, runner, engine, default_cache, sp)


def accept_cache(facts: ModelFacts, config: CacheConfig, steps: int, field: str) -> CacheConfig:
    """facts.accept with errors named as the caller sent the policy: `cache.dbcache.fn`,
    `--cache-policy.dbcache.fn`."""
    try:
        return facts.accept(config, steps)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}.{error.field.removeprefix('cache.')}", error.reason) from None
