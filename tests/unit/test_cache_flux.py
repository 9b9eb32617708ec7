"""The FLUX block executor and per-request cache state on the shipped tiny transformer (1 double + 2 single).

Bit-exact where no step is cached (torch.equal); where steps are cached, checks are against what the
cache must reproduce. Batched rows of different slots run in a different batch shape than alone, so
those comparisons allow float rounding (1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from diffusers import FluxTransformer2DModel
from factories import cached_forward, request_cache, tiny_flux

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.model import ModelDefaults
from ditserve.services.denoiser.cache.policy import (
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from ditserve.services.denoiser.cache.state import RequestCache, Slot, forward_batch
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.families.flux import FLUX1_TEACACHE_COEFFICIENTS
from ditserve.services.families.flux import latents as flux
from ditserve.services.families.flux.blocks import FluxBlockExecutor

CPU = torch.device("cpu")
TEXT_TOKENS = 8
STATIC_FAST = CacheConfig(dbcache=DBCacheConfig(scm=SCMConfig(preset="fast", policy="static")))
WHOLE_STEP_ULTRA = CacheConfig(
    dbcache=DBCacheConfig(
        fn=0, max_warmup_steps=0, taylorseer=TaylorSeerConfig(order=1), scm=SCMConfig(preset="ultra", policy="static")
    )
)

Predict = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def transformer() -> FluxTransformer2DModel:
    """`make-tiny-model`'s seeded transformer: the executor's mechanics, fast; the services' tests run the
    shipped model."""
    return tiny_flux(seed=0)


@pytest.fixture(scope="module")
def executor(transformer: FluxTransformer2DModel) -> FluxBlockExecutor:
    return FluxBlockExecutor(transformer)


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    with torch.inference_mode():
        yield


def _guided_transformer() -> FluxTransformer2DModel:
    """FLUX.1-dev's shape of model (guidance embedding, several blocks of each kind), tiny and random."""
    with torch.random.fork_rng():
        return tiny_flux(seed=1, num_layers=2, num_single_layers=3, guidance_embeds=True)


def _conditioning(batch: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Initial latents and the other transformer arguments, as the denoiser builds them."""
    generator = torch.Generator().manual_seed(seed)
    latents, image_ids = flux.initial_latents(
        num_images=batch,
        channels=4,
        height=64,
        width=64,
        scale=8,
        generator=generator,
        device=CPU,
        dtype=torch.float32,
    )
    return latents, {
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "img_ids": image_ids,
        "txt_ids": flux.text_ids(TEXT_TOKENS, CPU, torch.float32),
    }


def _denoise(predict: Predict, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler steps over linear sigmas: enough of a trajectory for consecutive steps to be alike."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for step in range(steps):
        timestep = sigmas[step].expand(latents.shape[0])
        latents = latents + (sigmas[step + 1] - sigmas[step]) * predict(step, latents, timestep)
    return latents


def _plain(transformer: FluxTransformer2DModel, kwargs: dict[str, torch.Tensor]) -> Predict:
    return lambda step, x, t: transformer(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]


def _cached(executor: FluxBlockExecutor, cache: RequestCache, steps: int, kwargs: dict[str, torch.Tensor]) -> Predict:
    return lambda step, x, t: cached_forward(
        executor, cache, "cond", step, steps, hidden_states=x, timestep=t, **kwargs
    )


def _plain_and_cached(
    transformer: FluxTransformer2DModel,
    executor: FluxBlockExecutor,
    config: CacheConfig,
    batch: int,
    seed: int,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor, RequestCache]:
    """From one start, the uncached trajectory, then the one `config` caches, and that one's cache state."""
    latents, kwargs = _conditioning(batch=batch, seed=seed)
    plain = _denoise(_plain(transformer, kwargs), latents, steps)
    cache = request_cache(config, executor)
    return plain, _denoise(_cached(executor, cache, steps, kwargs), latents, steps), cache


@pytest.mark.parametrize("guided", [False, True], ids=["tiny", "guidance"])
def test_staged_forward_is_the_transformer_bit_for_bit(transformer: FluxTransformer2DModel, guided: bool) -> None:
    model = _guided_transformer() if guided else transformer
    latents, kwargs = _conditioning(batch=2, seed=0)
    kwargs["timestep"] = torch.tensor([0.9, 0.3])
    if guided:
        kwargs["guidance"] = torch.tensor([3.5, 3.5])
    expected = model(hidden_states=latents, **kwargs, return_dict=False)[0]
    assert torch.equal(FluxBlockExecutor(model).staged_forward(hidden_states=latents, **kwargs), expected)


def test_block_sequence_is_double_then_single(executor: FluxBlockExecutor) -> None:
    model = executor.transformer
    assert executor.blocks == (*model.transformer_blocks, *model.single_transformer_blocks)
    assert (executor.num_blocks, executor.num_double_blocks) == (3, 1)


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(),
        CacheConfig(teacache=TeaCacheConfig(threshold=0.0)),
        CacheConfig(dbcache=DBCacheConfig(residual_diff_threshold=0.0, max_warmup_steps=0)),
    ],
    ids=["none", "teacache-0", "dbcache-0"],
)
def test_policy_none_and_threshold_zero_equal_no_caching(
    transformer: FluxTransformer2DModel, executor: FluxBlockExecutor, config: CacheConfig
) -> None:
    expected, cached, cache = _plain_and_cached(transformer, executor, config, batch=2, seed=1, steps=8)
    assert torch.equal(cached, expected)
    assert cache.branches["cond"].pattern == "1" * 8
    assert cache.skipped_fraction == 0.0


@pytest.mark.parametrize(
    "config",
    [CacheConfig(teacache=TeaCacheConfig(threshold=0.6)), STATIC_FAST],
    ids=["teacache", "dbcache"],
)
def test_off_on_off_returns_to_the_original(
    transformer: FluxTransformer2DModel, executor: FluxBlockExecutor, config: CacheConfig
) -> None:
    before, cached, cache = _plain_and_cached(transformer, executor, config, batch=1, seed=2, steps=12)
    after, _, _ = _plain_and_cached(transformer, executor, CacheConfig(), batch=1, seed=2, steps=12)
    assert "0" in cache.branches["cond"].pattern and cache.skipped_fraction > 0
    assert not torch.equal(cached, before) and torch.isfinite(cached).all()
    assert torch.equal(after, before)


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(teacache=TeaCacheConfig(threshold=100.0)),
        CacheConfig(dbcache=DBCacheConfig(bn=1, max_warmup_steps=1, residual_diff_threshold=1.0)),
        CacheConfig(dbcache=DBCacheConfig(max_warmup_steps=3, taylorseer=TaylorSeerConfig(order=2))),
        WHOLE_STEP_ULTRA,
    ],
    ids=["teacache", "dbcache-bn1", "dbcache-taylorseer2", "whole-step"],
)
def test_cached_steps_reproduce_an_unchanged_step(
    transformer: FluxTransformer2DModel, executor: FluxBlockExecutor, config: CacheConfig
) -> None:
    # The same input at every step: a reused (or forecast) residual is the one computing would give.
    latents, kwargs = _conditioning(batch=2, seed=3)
    kwargs["timestep"] = torch.tensor([0.5, 0.5])
    expected = transformer(hidden_states=latents, **kwargs, return_dict=False)[0]
    cache = request_cache(config, executor)
    outputs = [cached_forward(executor, cache, "cond", step, 6, hidden_states=latents, **kwargs) for step in range(6)]
    assert "0" in cache.branches["cond"].pattern
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_skipped_fraction_counts_middle_blocks(executor: FluxBlockExecutor) -> None:
    latents, kwargs = _conditioning(batch=1, seed=4)
    cache = request_cache(STATIC_FAST, executor)
    _denoise(_cached(executor, cache, 28, kwargs), latents, steps=28)
    assert cache.branches["cond"].pattern == "1111110100010000100000100001"
    # 17 cached steps skip the 2 middle blocks (Fn 1, Bn 0) of 3, over 28 steps.
    assert cache.skipped_fraction == pytest.approx(17 * 2 / (28 * 3))


def test_whole_step_cache_runs_nothing_of_the_model_on_cached_steps(
    transformer: FluxTransformer2DModel, executor: FluxBlockExecutor
) -> None:
    latents, kwargs = _conditioning(batch=1, seed=4)
    cache = request_cache(WHOLE_STEP_ULTRA, executor)
    embeds = []
    handle = transformer.x_embedder.register_forward_hook(lambda *_: embeds.append(1))
    try:
        cached = _denoise(_cached(executor, cache, 28, kwargs), latents, steps=28)
    finally:
        handle.remove()
    assert cache.branches["cond"].pattern == "1111001000001000000100000001"
    assert len(embeds) == 8 and cache.skipped_fraction == pytest.approx(20 / 28)
    # The forecast steps follow the computed ones: close to the uncached trajectory, yet not it.
    plain = _denoise(_plain(transformer, kwargs), latents, steps=28)
    assert not torch.equal(cached, plain)
    assert (cached - plain).abs().mean() < 0.1 * plain.abs().mean()


def test_cond_and_uncond_keep_separate_state(transformer: FluxTransformer2DModel, executor: FluxBlockExecutor) -> None:
    steps = 10
    latents, cond = _conditioning(batch=1, seed=5)
    _, uncond = _conditioning(batch=1, seed=6)
    shared = request_cache(STATIC_FAST, executor)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"cond": [], "uncond": []}

    def cfg(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outputs = {}
        for name, kwargs in (("cond", cond), ("uncond", uncond)):
            outputs[name] = cached_forward(executor, shared, name, step, steps, hidden_states=x, timestep=t, **kwargs)
            calls[name].append((x, t, outputs[name]))
        return outputs["uncond"] + 4.0 * (outputs["cond"] - outputs["uncond"])

    _denoise(cfg, latents, steps)
    pattern = shared.branches["cond"].pattern
    assert "0" in pattern and shared.branches["uncond"].pattern == pattern
    # Each branch alone, on the inputs it saw, gives the same outputs: neither leaked into the other.
    for name, kwargs in (("cond", cond), ("uncond", uncond)):
        alone = request_cache(STATIC_FAST, executor)
        for step, (x, t, output) in enumerate(calls[name]):
            again = cached_forward(executor, alone, "cond", step, steps, hidden_states=x, timestep=t, **kwargs)
            assert torch.equal(again, output)
    # And sharing would matter: the residuals the two branches reuse differ.
    last = steps - 1
    assert not torch.allclose(shared.branch("cond").reuse(last)[0], shared.branch("uncond").reuse(last)[0])
    with pytest.raises(ValueError, match="in order"):
        cached_forward(executor, shared, "cond", 3, steps, hidden_states=latents, timestep=torch.ones(1), **cond)


def test_batched_slots_decide_independently(executor: FluxBlockExecutor) -> None:
    steps = 8
    configs = [CacheConfig(), CacheConfig(teacache=TeaCacheConfig(threshold=0.6)), STATIC_FAST, WHOLE_STEP_ULTRA]
    inputs = [_conditioning(batch=1, seed=10 + index) for index in range(len(configs))]
    latents = torch.cat([x for x, _ in inputs])
    kwargs = {
        "encoder_hidden_states": torch.cat([k["encoder_hidden_states"] for _, k in inputs]),
        "pooled_projections": torch.cat([k["pooled_projections"] for _, k in inputs]),
        "img_ids": inputs[0][1]["img_ids"],
        "txt_ids": inputs[0][1]["txt_ids"],
    }
    batched = [request_cache(config, executor) for config in configs]

    def predict(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        slots = [Slot(cache.branch("cond"), step, steps, rows=1) for cache in batched]
        return forward_batch(executor, slots, hidden_states=x, timestep=t, **kwargs)

    together = _denoise(predict, latents, steps)
    patterns = [cache.branches["cond"].pattern for cache in batched]
    assert len(set(patterns)) == 4  # none, TeaCache, DBCache and whole-step differ at some step
    for index, (config, (x, alone_kwargs)) in enumerate(zip(configs, inputs, strict=True)):
        alone = request_cache(config, executor)
        torch.testing.assert_close(
            _denoise(_cached(executor, alone, steps, alone_kwargs), x, steps),
            together[index : index + 1],
            rtol=0,
            atol=1e-5,
        )
        assert alone.branches["cond"].pattern == patterns[index]


def test_configs_the_model_cannot_serve_fail_at_admission(executor: FluxBlockExecutor) -> None:
    too_deep = CacheConfig(dbcache=DBCacheConfig(fn=2, bn=1))
    teacache = CacheConfig(teacache=TeaCacheConfig())
    facts = ModelFacts(ModelDefaults(), FLUX1_TEACACHE_COEFFICIENTS, num_blocks=executor.num_blocks)
    uncalibrated = ModelFacts(ModelDefaults(), None, num_blocks=executor.num_blocks)
    assert facts.accept(teacache, 8) == teacache
    for config, model, field in ((too_deep, facts, "dbcache.fn"), (teacache, uncalibrated, "teacache.coefficients")):
        with pytest.raises(InvalidArgument) as error:  # admission: pure logic on the model's facts
            model.accept(config, 8)
        assert error.value.field == field
        with pytest.raises(InvalidArgument) as error:  # and the cache state refuses it too
            RequestCache(config, model.num_blocks, model.teacache_coefficients)
        assert error.value.field == field
