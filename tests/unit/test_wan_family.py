"""The Wan family's transformer stages, attention processor and sequence-parallel executor, on CPU.

The staged forward (embed, every block, finish) and our attention processor (torch_sdpa) reproduce
WanTransformer3DModel's own forward with diffusers' default processor bit for bit. Sequence parallelism
(U=2, R=2, U=2xR=2 local gloo worlds of services/tools/sp_world.py) shards the video tokens and their
rotary tables, keeps cross-attention local, and gathers the output: measured within 4.8e-7 of one
process (FP32, outputs up to ~3), held to the same ATOL as FLUX's tests (2e-6).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ditserve.services.denoiser.attention import BackendName
from ditserve.services.denoiser.parallel.mesh import SPConfig, SPMesh
from ditserve.services.families.wan.attention import apply_attention_backend
from ditserve.services.families.wan.blocks import WanBlockExecutor
from ditserve.services.families.wan.parallel import SequenceParallelWanExecutor
from ditserve.services.tools.modelgen.tiny_wan import tiny_wan_transformer
from ditserve.services.tools.sp_world import run_world

ATOL = 2e-6
WORLDS = {"U2": SPConfig(ulysses=2), "R2": SPConfig(ring=2), "U2xR2": SPConfig(2, 2)}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 9-frame 64x64 clip's latents (3 x 8 x 8, 48 tokens after 1x2x2 patches) and 12 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([700]),
        "encoder_hidden_states": torch.randn(1, 12, 32, generator=generator),
    }


def test_staged_forward_and_our_processor_match_the_model_bit_for_bit() -> None:
    model = tiny_wan_transformer(seed=0).eval()
    inputs = _inputs()
    with torch.inference_mode():
        expected = model(**inputs, return_dict=False)[0]  # diffusers' own WanAttnProcessor
        apply_attention_backend(model, BackendName.TORCH_SDPA)
        executor = WanBlockExecutor(model)
        assert torch.equal(executor.forward(**inputs), expected)
        assert torch.equal(executor.staged_forward(**inputs), expected)
        embedded = executor.embed(**inputs)
    assert embedded.grid == (3, 4, 4) and embedded.hidden_states.shape[1] == 48
    assert torch.equal(executor.cache_signal(embedded.hidden_states, embedded.temb), embedded.temb)


def _sp_rank(mesh: SPMesh) -> dict[str, Any]:
    model = tiny_wan_transformer(seed=0).eval()
    inputs = _inputs()
    with torch.inference_mode():
        apply_attention_backend(model, BackendName.TORCH_SDPA)
        expected = model(**inputs, return_dict=False)[0]
        parallel = SequenceParallelWanExecutor(model, mesh, BackendName.TORCH_SDPA)
        output = parallel.forward(**inputs)
        previous = output + 0.01
        distance = parallel.relative_l1(output, previous)
        plain = ((output - previous).abs().mean() / previous.abs().mean()).item()
    return {"error": (output - expected).abs().max().item(), "distance": distance, "plain": plain}


@pytest.mark.parametrize("world", list(WORLDS))
def test_sequence_parallel_executor_matches_one_process(world: str) -> None:
    for rank in run_world(WORLDS[world], _sp_rank):
        assert rank["error"] <= ATOL
        # every rank holds the full output, so the all-reduced distance is the single-process one
        assert rank["distance"] == pytest.approx(rank["plain"], rel=1e-5)


def test_uneven_video_tokens_are_refused_not_padded() -> None:
    """A rank's ValueError fails the world (torch re-raises it as ProcessRaisedException with its text)."""
    with pytest.raises(Exception, match="the video has 25 tokens, not divisible by the 2 sequence-parallel ranks"):
        run_world(SPConfig(ulysses=2), _uneven_rank)


def _uneven_rank(mesh: SPMesh) -> None:
    model = tiny_wan_transformer(seed=0).eval()
    parallel = SequenceParallelWanExecutor(model, mesh, BackendName.TORCH_SDPA)
    inputs = {**_inputs(), "hidden_states": torch.randn(1, 4, 1, 10, 10)}  # 25 tokens
    with torch.inference_mode():
        parallel.forward(**inputs)
