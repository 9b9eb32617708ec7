"""Profiling helpers on CPU: safe trace names, and NVTX block hooks that never change the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import tiny_flux

from ditserve.services.common import profiling
from ditserve.services.common.errors import InvalidArgument


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b", "é"])
def test_unsafe_trace_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        profiling.trace_path(tmp_path, name)


def test_trace_names_stay_inside_the_profile_dir(tmp_path: Path) -> None:
    assert profiling.trace_path(tmp_path, "run-1.a_b").parent == tmp_path.resolve()


def test_block_ranges_leave_outputs_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVTX itself needs CUDA; the hooks' contract with torch (return None, pop after) is ours to test."""
    calls: list[str] = []
    monkeypatch.setattr(profiling, "_nvtx", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name) or len(calls))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop") or 0)
    model = tiny_flux(seed=0)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }
    with torch.inference_mode():
        before = model(**inputs)[0]
        profiling.add_block_ranges(list(model.transformer_blocks), "double_block")
        profiling.add_block_ranges(list(model.single_transformer_blocks), "single_block")
        after = model(**inputs)[0]
    assert torch.equal(before, after)
    assert calls == ["double_block[0]", "pop", "single_block[0]", "pop", "single_block[1]", "pop"]
