"""The attention registry: every backend that runs here agrees with sdpa_math; the FLUX processor is exact.

Tolerances (FP32, measured on CPU with torch 2.13): torch_sdpa and sdpa_flash differ from sdpa_math by
4.2e-7 at most on this input, held to KERNEL_ATOL = 1e-6. In the tiny transformer, `torch_sdpa` is
bit-identical to diffusers' default processor (the same SDPA call), `sdpa_math` is bit-identical to
diffusers' own `_native_math` backend, and `sdpa_math` vs the default (PyTorch's CPU flash kernel)
differs by 4.8e-7 at most (outputs up to 2.0), held to 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from factories import tiny_flux

from ditserve.services.denoiser.attention import (
    ENV_VAR,
    AttentionBackendUnavailable,
    BackendName,
    attention,
    available_backends,
    benchmark,
    default_backend_name,
    registry,
    resolve_backend,
)
from ditserve.services.denoiser.attention.choice import AttentionShape, AutoTune
from ditserve.services.families.flux.attention import DitserveFluxAttnProcessor, apply_attention_backend

CPU = torch.device("cpu")
HEADS, HEAD_DIM, TEXT_TOKENS, IMAGE_TOKENS = 2, 16, 24, 64
KERNEL_ATOL = 1e-6
CONCRETE = [name for name in BackendName if name is not BackendName.AUTO]


@pytest.fixture(scope="module")
def joint_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text tokens then image tokens, [batch, seq, heads, head_dim], as FLUX's double blocks attend."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, TEXT_TOKENS + IMAGE_TOKENS, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("backend", CONCRETE, ids=lambda name: name.value)
def test_backend_agrees_with_sdpa_math(backend: BackendName, joint_qkv: tuple[torch.Tensor, ...]) -> None:
    reason = available_backends(CPU, torch.float32, HEAD_DIM)[backend]
    if reason is not None:
        pytest.skip(reason)
    out = attention(*joint_qkv, backend)
    assert out.shape == joint_qkv[0].shape
    torch.testing.assert_close(out, attention(*joint_qkv, BackendName.SDPA_MATH), rtol=0, atol=KERNEL_ATOL)


def test_explicit_unavailable_backend_lists_every_backend() -> None:
    with pytest.raises(AttentionBackendUnavailable) as raised:
        resolve_backend("fa", CPU, torch.float32, HEAD_DIM)
    message = str(raised.value)
    assert "'fa' cannot run" in message
    assert all(name.value in message for name in CONCRETE)
    assert set(raised.value.availability) == set(CONCRETE)
    assert raised.value.availability[BackendName.SDPA_MATH] is None


def test_unknown_backend_is_refused_with_the_known_names() -> None:
    with pytest.raises(AttentionBackendUnavailable, match=r"unknown attention backend 'flash3'.*sage_attn"):
        resolve_backend("flash3", CPU, torch.float32, HEAD_DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_on_cpu_picks_an_available_backend(dtype: torch.dtype) -> None:
    chosen, reason = resolve_backend("auto", CPU, dtype, HEAD_DIM)
    assert available_backends(CPU, dtype, HEAD_DIM)[chosen] is None
    assert chosen.value in reason


@pytest.mark.parametrize(
    ("capability", "dtype", "fa3_installed", "expected"),
    [
        ((9, 0), torch.bfloat16, True, BackendName.FA),
        ((9, 0), torch.bfloat16, False, BackendName.SDPA_CUDNN),
        ((9, 0), torch.float32, True, BackendName.TORCH_SDPA),
        ((8, 0), torch.bfloat16, False, BackendName.TORCH_SDPA),
        ((10, 0), torch.float16, False, BackendName.TORCH_SDPA),
    ],
)
def test_auto_rules_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    dtype: torch.dtype,
    fa3_installed: bool,
    expected: BackendName,
) -> None:
    """The GPU half of the rules, on any machine: capability and installed packages are faked."""
    fa3 = SimpleNamespace(flash_attn_func=None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        registry,
        "_import",
        lambda module: (fa3, None) if fa3_installed and module == "flash_attn_interface" else (None, "absent"),
    )
    availability = dict.fromkeys(CONCRETE, None) | {BackendName.FA: None if fa3_installed else "absent"}
    chosen, _ = registry._auto(torch.device("cuda"), dtype, availability)
    assert chosen is expected


def test_explicit_available_backend_resolves_to_itself() -> None:
    assert resolve_backend("sdpa_math", CPU, torch.float32, HEAD_DIM)[0] is BackendName.SDPA_MATH


def test_auto_must_be_resolved_before_dispatch(joint_qkv: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(ValueError, match="resolve 'auto'"):
        attention(*joint_qkv, BackendName.AUTO)


def test_default_backend_name_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_backend_name() == "auto"
    monkeypatch.setenv(ENV_VAR, "sdpa_math")
    assert default_backend_name() == "sdpa_math"


def _tiny_flux() -> FluxTransformer2DModel:
    """1 double + 1 single block, HEADS x HEAD_DIM: two attention processors."""
    return tiny_flux(seed=0, num_single_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS)


@pytest.fixture(scope="module")
def flux_inputs() -> dict[str, torch.Tensor]:
    """An 8x8 latent grid (64 image tokens) and 24 text tokens, with real 2-D rotary positions."""
    generator = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    img_ids = torch.stack([torch.zeros(IMAGE_TOKENS), rows.flatten(), cols.flatten()], dim=-1)
    return {
        "hidden_states": torch.randn(1, IMAGE_TOKENS, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def _run(model: FluxTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def diffusers_default(flux_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return _run(_tiny_flux(), flux_inputs)


def _with_our_processor(backend: BackendName, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = _tiny_flux()
    apply_attention_backend(model, backend)
    processors = model.attn_processors.values()
    assert len(processors) == 2 and all(isinstance(p, DitserveFluxAttnProcessor) for p in processors)
    return _run(model, inputs)


def test_processor_with_torch_sdpa_is_bit_identical_to_diffusers(
    flux_inputs: dict[str, torch.Tensor], diffusers_default: torch.Tensor
) -> None:
    assert torch.equal(_with_our_processor(BackendName.TORCH_SDPA, flux_inputs), diffusers_default)


def test_processor_with_sdpa_math_matches_diffusers(
    flux_inputs: dict[str, torch.Tensor], diffusers_default: torch.Tensor
) -> None:
    ours = _with_our_processor(BackendName.SDPA_MATH, flux_inputs)
    torch.testing.assert_close(ours, diffusers_default, rtol=0, atol=KERNEL_ATOL)
    diffusers_math = _tiny_flux()
    active, _ = _AttentionBackendRegistry.get_active_backend()
    try:
        diffusers_math.set_attention_backend("_native_math")
        assert torch.equal(ours, _run(diffusers_math, flux_inputs))
    finally:  # set_attention_backend also sets a process-wide default; later tests must not inherit it
        _AttentionBackendRegistry.set_active_backend(active)


def test_forced_benchmark_on_cpu_chooses_caches_and_then_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` measured on the CPU's exact backends (--attention-benchmark on): it picks one of them and writes
    the cache; the second resolve reads it and times nothing (timing would raise)."""
    cache = tmp_path / "attention-auto.json"
    autotune = AutoTune(AttentionShape(1, TEXT_TOKENS + IMAGE_TOKENS, HEADS, HEAD_DIM, "fp32"), "on", cache)
    chosen, reason = resolve_backend("auto", CPU, torch.float32, HEAD_DIM, autotune)
    timed = benchmark.candidates(available_backends(CPU, torch.float32, HEAD_DIM))
    assert {BackendName.TORCH_SDPA, BackendName.SDPA_FLASH} <= set(timed)
    assert BackendName.SDPA_MATH not in timed
    assert chosen in timed
    assert all(f"{name.value} " in reason for name in timed), reason  # every backend's time
    assert "fastest within 0.0001 of torch_sdpa" in reason
    assert json.loads(cache.read_text())  # one decision written

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(benchmark, "time_backends", no_timing)
    again, cached_reason = resolve_backend("auto", CPU, torch.float32, HEAD_DIM, autotune)
    assert again is chosen
    assert cached_reason.startswith(reason) and f"cached in {cache}" in cached_reason


def test_auto_on_cpu_keeps_the_rules_unless_forced(tmp_path: Path) -> None:
    cache = tmp_path / "attention-auto.json"
    autotune = AutoTune(AttentionShape(1, IMAGE_TOKENS, HEADS, HEAD_DIM, "fp32"), "auto", cache)
    chosen, reason = resolve_backend("auto", CPU, torch.float32, HEAD_DIM, autotune)
    assert chosen is BackendName.TORCH_SDPA and "off CUDA" in reason
    assert not cache.exists()
