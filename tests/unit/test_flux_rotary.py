"""FLUX's rotary embedding computed once per set of position ids (families/flux/rotary.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from factories import tiny_flux

from ditserve.services.families.flux import latents as flux
from ditserve.services.families.flux.blocks import FluxBlockExecutor
from ditserve.services.families.flux.rotary import RotaryMemo

AXES = [4, 14, 14]
CPU = torch.device("cpu")


class Counting(torch.nn.Module):
    """FluxPosEmbed, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = FluxPosEmbed(theta=10000, axes_dim=AXES)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.inner(ids)


def ids(tokens: int, offset: float = 0.0) -> torch.Tensor:
    return torch.arange(tokens * 3, dtype=torch.float32).reshape(tokens, 3) + offset


@torch.inference_mode()
def test_equal_ids_get_the_stored_embedding_which_is_what_the_module_computes() -> None:
    counting = Counting()
    memo = RotaryMemo(counting)
    first = memo(ids(20))
    again = memo(ids(20))  # equal values, another tensor
    assert counting.calls == 1 and again[0] is first[0] and again[1] is first[1]
    expected = FluxPosEmbed(theta=10000, axes_dim=AXES)(ids(20))
    assert torch.equal(first[0], expected[0]) and torch.equal(first[1], expected[1])
    other = memo(ids(20, offset=1.0))
    assert counting.calls == 2 and not torch.equal(other[0], first[0])


@torch.inference_mode()
def test_it_keeps_only_the_newest_few_sets_of_ids() -> None:
    counting = Counting()
    memo = RotaryMemo(counting, capacity=2)
    memo(ids(4))
    memo(ids(5))
    memo(ids(4))  # a hit: now the newest
    memo(ids(6))  # evicts ids(5), the oldest
    assert counting.calls == 3
    memo(ids(4))
    memo(ids(6))
    assert counting.calls == 3
    memo(ids(5))
    assert counting.calls == 4


def test_with_autograd_on_it_computes_and_stores_nothing() -> None:
    counting = Counting()
    memo = RotaryMemo(counting)
    memo(ids(4))
    memo(ids(4))
    assert counting.calls == 2 and not memo._entries
    with pytest.raises(ValueError, match="capacity"):
        RotaryMemo(counting, capacity=0)


@torch.inference_mode()
def test_the_executor_computes_a_requests_rotary_embedding_once_and_stays_bit_exact() -> None:
    """The model's own forward (uncached calls) goes through the memo too, with the same output."""
    reference, transformer = tiny_flux(seed=0), tiny_flux(seed=0)
    executor = FluxBlockExecutor(transformer)
    counting = Counting()
    counting.inner = transformer.pos_embed.inner
    transformer.pos_embed.inner = counting
    generator = torch.Generator().manual_seed(0)
    latents, image_ids = flux.initial_latents(
        num_images=1, channels=4, height=64, width=64, scale=8, generator=generator, device=CPU, dtype=torch.float32
    )
    inputs = {
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "img_ids": image_ids,
        "txt_ids": flux.text_ids(8, CPU, torch.float32),
    }
    for step in range(3):
        kwargs = {**inputs, "hidden_states": latents + step, "timestep": torch.tensor([1.0 - step / 3])}
        expected = reference(**kwargs, return_dict=False)[0]
        assert torch.equal(executor.forward(**kwargs), expected)
        assert torch.equal(executor.staged_forward(**kwargs), expected)
    assert counting.calls == 1
