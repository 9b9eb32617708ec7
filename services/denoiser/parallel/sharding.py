"""A family's token inputs split across the sequence-parallel world, and the output gathered back.

Rank i holds the i-th contiguous slice of every token input the family names (its token axes), so a
family's sharding plan is data: FLUX's shards text and image tokens with their rotary ids
(families/flux/parallel.py says why). Uneven token counts are rejected, not padded: padding would need
masked keys, which no dispatch kernel here takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ditserve.services.denoiser.parallel.mesh import SPGroup


@dataclass(frozen=True)
class SequenceSharder:
    """This rank's slice of the transformer's token inputs, and the gather of the output tokens."""

    group: SPGroup
    token_axes: Mapping[str, int]  # the transformer's keyword arguments that carry tokens -> their axis

    def shard(self, tensor: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        tokens = tensor.shape[dim]
        if tokens % self.group.size:
            raise ValueError(
                f"{what} has {tokens} tokens, not divisible by the {self.group.size} sequence-parallel ranks"
            )
        return tensor.chunk(self.group.size, dim)[self.group.index]

    def shard_inputs(self, transformer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The same keyword arguments with every token input cut to this rank's slice."""
        sharded = dict(transformer_kwargs)
        for name, dim in self.token_axes.items():
            sharded[name] = self.shard(transformer_kwargs[name], dim, name)
        return sharded

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """The step cache's distance over the whole sequence, the same float on every rank.

        mean|c - p| / mean|p| over equal shards is the ratio of the summed shards' sums; one all_reduce
        of those two sums gives every rank the same bits, so every rank caches or computes alike.
        """
        sums = torch.stack(
            [(current - previous).abs().sum(dtype=torch.float64), previous.abs().sum(dtype=torch.float64)]
        )
        sums = self.group.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, tokens / world, channels] on each rank -> the full output on every rank."""
        return self.group.all_gather(tokens, dim=1)
