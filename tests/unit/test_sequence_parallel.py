"""Sequence parallelism on CPU with gloo: U=2, R=2 and U=2xR=2 give the single-process results.

Worlds of 2 or 4 local processes (services/tools/sp_world.py: a forkserver, loopback, a free
port, OMP_NUM_THREADS=1). U=2 and R=2 run `make-tiny-model`'s seeded transformer (2 heads x 16); U=2xR=2 a
random FLUX transformer with 4 heads x 16, so each Ulysses rank holds two heads and their order is checked too.

Tolerances (FP32, CPU, torch 2.13), measured: SP attention vs plain softmax attention (sdpa_math)
differs by 6.6e-7 at most over the sdpa_math, torch_sdpa and sdpa_flash backends (0 for Ulysses over
sdpa_math: the same kernel on the same keys); a full transformer forward vs the single-process forward
by 4.8e-7 at most (outputs up to 2.2); the flash LSE kernel vs the math one by 4.8e-7. All held to
ATOL = 2e-6. The step cache's all-reduced distance (FP64 sums) vs the single-process FP32 means:
7.1e-7 relative, held to 1e-5; the decisions are identical.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from factories import cached_forward, request_cache, tiny_flux

from ditserve.services.denoiser.attention import BackendName, attention
from ditserve.services.denoiser.cache.policy import CacheConfig, DBCacheConfig
from ditserve.services.denoiser.parallel.attention import (
    SequenceParallelAttention,
    flash_attention_lse,
    lse_kernel,
    math_attention_lse,
    merge_partials,
)
from ditserve.services.denoiser.parallel.mesh import ByteCounter, SPConfig, SPGroup, SPMesh
from ditserve.services.denoiser.parallel.sharding import SequenceSharder
from ditserve.services.families.flux.attention import apply_attention_backend
from ditserve.services.families.flux.blocks import FluxBlockExecutor
from ditserve.services.families.flux.parallel import TOKEN_AXES, SequenceParallelFluxExecutor
from ditserve.services.tools.bench import sp as bench_sp
from ditserve.services.tools.sp_cost import AttentionShape, bytes_per_forward
from ditserve.services.tools.sp_world import run_world

ATOL = 2e-6
TEXT_TOKENS, IMAGE_SIDE = 8, 8  # 8 + 64 tokens: both divisible by every world size here
BACKENDS = (BackendName.SDPA_MATH, BackendName.TORCH_SDPA, BackendName.SDPA_FLASH)
WORLDS = {
    "U2": (SPConfig(ulysses=2), "tiny"),
    "R2": (SPConfig(ring=2), "tiny"),
    "U2xR2": (SPConfig(2, 2), "4x16"),
}


def _model(name: str) -> FluxTransformer2DModel:
    return tiny_flux(seed=0) if name == "tiny" else tiny_flux(seed=0, num_attention_heads=4)


def _inputs(seed: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
    """FLUX transformer inputs; `step` drifts the latents slightly, as consecutive denoising steps do."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = IMAGE_SIDE * IMAGE_SIDE
    latents, drift = (torch.randn(1, image_tokens, 16, generator=generator) for _ in range(2))
    image_ids = torch.zeros(image_tokens, 3)
    image_ids[:, 1] = torch.arange(image_tokens) // IMAGE_SIDE
    image_ids[:, 2] = torch.arange(image_tokens) % IMAGE_SIDE
    return {
        "hidden_states": latents + 0.02 * step * drift,
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": image_ids,
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def _qkv(heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (2, TEXT_TOKENS + IMAGE_SIDE * IMAGE_SIDE, heads, 16)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    return q, k, v


# ---- per-rank work (module level: the world's processes import it by name) ----


def _check_rank(mesh: SPMesh, model_name: str) -> dict[str, Any]:
    """SP attention alone vs plain attention, then the SP transformer vs its single-process forward."""
    model = _model(model_name)
    heads = model.config.num_attention_heads
    q, k, v = _qkv(heads)
    reference = attention(q, k, v, BackendName.SDPA_MATH)
    world, rank = mesh.config.world_size, mesh.rank

    def shard(x: torch.Tensor) -> torch.Tensor:
        return x.chunk(world, dim=1)[rank]

    attention_errors = {
        backend.value: (SequenceParallelAttention(mesh, backend)(*map(shard, (q, k, v))) - shard(reference))
        .abs()
        .max()
        .item()
        for backend in BACKENDS
    }
    inputs = _inputs()
    with torch.inference_mode():
        apply_attention_backend(model, BackendName.TORCH_SDPA)
        expected = model(**inputs, return_dict=False)[0]
        parallel = SequenceParallelFluxExecutor(model, mesh, BackendName.TORCH_SDPA)
        mesh.counter.reset()
        output = parallel.forward(**inputs)
    return {
        "heads": heads,
        "attention_errors": attention_errors,
        "forward_error": (output - expected).abs().max().item(),
        "bytes": dict(mesh.counter.sent),
    }


CACHE_STEPS = 8
# Fn 1, Bn 1 (so the text stream's residual is cached too); distances here are 0.017, 0.035 and 0.052:
# 0.04 caches some steps and computes others, far enough from every distance for rounding not to matter.
CACHE = CacheConfig(
    dbcache=DBCacheConfig(
        fn=1,
        bn=1,
        residual_diff_threshold=0.04,
        max_warmup_steps=1,
        max_continuous_cached_steps=2,
    )
)


def _cached_trajectory(executor: FluxBlockExecutor) -> tuple[list[bool], list[float], list[torch.Tensor]]:
    """CACHE_STEPS steps of DBCache, recording the distances the executor's relative_l1 gave the policy."""
    distances: list[float] = []
    measure = executor.relative_l1

    def recorded(current: torch.Tensor, previous: torch.Tensor) -> float:
        distances.append(measure(current, previous))
        return distances[-1]

    executor.relative_l1 = recorded  # observe, do not change: it returns what the real one returns
    cache = request_cache(CACHE, executor)
    with torch.inference_mode():
        outputs = [
            cached_forward(executor, cache, "cond", s, CACHE_STEPS, **_inputs(step=s)) for s in range(CACHE_STEPS)
        ]
    return cache.decisions()["cond"], distances, outputs


def _cache_rank(mesh: SPMesh) -> dict[str, Any]:
    model = _model("tiny")
    apply_attention_backend(model, BackendName.TORCH_SDPA)
    expected = _cached_trajectory(FluxBlockExecutor(model))
    got = _cached_trajectory(SequenceParallelFluxExecutor(model, mesh, BackendName.TORCH_SDPA))
    return {
        "expected": expected[:2],
        "got": got[:2],
        "output_error": max((a - b).abs().max().item() for a, b in zip(got[2], expected[2], strict=True)),
    }


@functools.cache
def _world(name: str) -> list[dict[str, Any]]:
    config, model_name = WORLDS[name]
    return run_world(config, _check_rank, model_name)


# ---- single process ----


def test_config_is_validated() -> None:
    assert SPConfig(2, 2).world_size == 4
    for bad in ({"ulysses": 0}, {"ring": -1}, {"ulysses": True}, {"ring": 1.5}):
        with pytest.raises(ValueError, match="degree must be an integer"):
            SPConfig(**bad)
    SPConfig(ulysses=2).check_heads(24)
    with pytest.raises(ValueError, match="must divide the attention heads"):
        SPConfig(ulysses=5).check_heads(24)


def test_merging_key_blocks_by_lse_is_exact() -> None:
    """Ring attention's arithmetic without the ring: partials over 3 key blocks merge to the full result."""
    q, k, v = _qkv(heads=2)
    expected_out, expected_lse = math_attention_lse(q, k, v)
    out, lse = None, None
    for k_block, v_block in zip(k.chunk(3, dim=1), v.chunk(3, dim=1), strict=True):
        block = math_attention_lse(q, k_block, v_block)
        out, lse = block if out is None else merge_partials(out, lse, *block)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=ATOL)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=ATOL)
    torch.testing.assert_close(expected_out, attention(q, k, v, BackendName.SDPA_MATH), rtol=0, atol=ATOL)


def test_flash_lse_kernel_agrees_with_math() -> None:
    q, k, v = _qkv(heads=2)
    for got, expected in zip(flash_attention_lse(q, k, v), math_attention_lse(q, k, v), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_ring_refuses_a_backend_without_lse() -> None:
    assert lse_kernel(BackendName.TORCH_SDPA) is flash_attention_lse
    with pytest.raises(ValueError, match="log-sum-exp"):
        lse_kernel(BackendName.FA)


def test_sharder_slices_text_image_and_ids_alike() -> None:
    group = SPGroup(ranks=(0, 1, 2, 3), index=2, group=None, counter=ByteCounter())
    inputs = _inputs()
    sharded = SequenceSharder(group, TOKEN_AXES).shard_inputs(inputs)
    assert torch.equal(sharded["hidden_states"], inputs["hidden_states"][:, 32:48])
    assert torch.equal(sharded["img_ids"], inputs["img_ids"][32:48])
    assert torch.equal(sharded["encoder_hidden_states"], inputs["encoder_hidden_states"][:, 4:6])
    assert torch.equal(sharded["txt_ids"], inputs["txt_ids"][4:6])
    assert sharded["pooled_projections"] is inputs["pooled_projections"]
    with pytest.raises(ValueError, match="6 tokens, not divisible by the 4"):
        SequenceSharder(group, TOKEN_AXES).shard(torch.zeros(1, 6, 2), 1, "encoder_hidden_states")


# ---- worlds of processes ----


@pytest.mark.parametrize("name", WORLDS)
def test_sp_attention_matches_softmax_attention(name: str) -> None:
    for rank in _world(name):
        for backend, error in rank["attention_errors"].items():
            assert error <= ATOL, f"{name} rank attention with {backend}: {error}"


@pytest.mark.parametrize("name", WORLDS)
def test_sp_transformer_matches_single_process(name: str) -> None:
    config = WORLDS[name][0]
    ranks = _world(name)
    assert max(rank["forward_error"] for rank in ranks) <= ATOL
    shape = AttentionShape(
        sequence=TEXT_TOKENS + IMAGE_SIDE**2,
        hidden=ranks[0]["heads"] * 16,
        attention_layers=3,  # 1 double + 2 single blocks
        output_tokens=IMAGE_SIDE**2,
        output_features=16,
        element_size=4,
    )
    for rank in ranks:  # every rank sends what the closed form says, collective by collective
        assert rank["bytes"] == bytes_per_forward(config, shape)


def test_step_cache_decides_alike_on_every_rank() -> None:
    """Each rank sees only its shard of the cache's signal; the executor's all-reduced distance, which
    the cache policy decides on, makes them agree (each rank alone would judge its own shard)."""
    ranks = run_world(SPConfig(ring=2), _cache_rank)
    expected_decisions, expected_distances = ranks[0]["expected"]
    assert True in expected_decisions[1:] and False in expected_decisions  # the test exercises both
    for rank in ranks:
        decisions, distances = rank["got"]
        assert decisions == expected_decisions
        torch.testing.assert_close(distances, expected_distances, rtol=1e-5, atol=0)
        assert rank["output_error"] <= ATOL
    assert ranks[0]["got"] == ranks[1]["got"]  # bit-identical floats on both ranks


def test_bench_sp_reports_error_and_bytes() -> None:
    parser = argparse.ArgumentParser()
    bench_sp.add_arguments(parser)
    document = bench_sp.run(parser.parse_args(["--configs", "2x2", "--image-tokens", "64"]))
    (row,) = document["rows"]
    assert (row["ulysses"], row["ring"], row["world_size"]) == (2, 2, 4)
    assert row["max_abs_error"] <= ATOL
    assert row["bytes_per_step_per_rank"] == row["predicted_bytes_per_step_per_rank"]
    assert document["summary"]["bytes_match_formula"]
    flux = document["summary"]["extrapolated_bytes_per_forward_per_rank"]["FLUX.1-dev 1024x1024"]["U2xR2"]
    assert flux["total"] == 1_614_151_680  # 57 layers x 4608 tokens x 3072 x bf16, plus the gather


def test_bench_module_does_not_import_torch() -> None:
    code = "import sys, ditserve.services.tools.bench.sp; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
