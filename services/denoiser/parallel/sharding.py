"""How FLUX's joint sequence (text tokens, then image tokens) is split across the sequence-parallel world.

Both streams are sharded: rank i holds the i-th contiguous slice of the text tokens and of the image
tokens, and the matching rows of txt_ids and img_ids. That is diffusers' own FLUX context-parallel plan
(`FluxTransformer2DModel._cp_plan`), chosen over replicating the text on every rank because:
- Correctness holds either way. Attention is over the union of all ranks' keys, and joint attention has
  no mask and is not causal, so a rank's [its text, its image] order is as good as [all text, all image].
  Every other layer of the blocks (projections, MLPs, AdaLN with the global `temb`) is per token.
- The rotary embeddings stay consistent for free: the model computes them from cat(txt_ids, img_ids), so
  sharding the ids like the tokens gives each token its own rotation (q and k are rotated before any
  exchange, and the exchange moves rotated keys with them).
- Replicated text would repeat the text stream's work (its projections and MLPs in the 19 double blocks,
  and all of a single block's work on those tokens) on every rank: at 1024^2 with 8 ranks each rank would
  hold 512 text + 512 image tokens, doubling its work; Ulysses would also need a head all-gather for the
  text output. Sharding costs only the text tokens' share of the exchanged bytes (512 of 4608 at 1024^2).
The price: text and image token counts must divide by the world size (FLUX.1: 512 text tokens, 4096 image
tokens at 1024^2, divisible by 1..8 and 2..512 respectively). Uneven counts are rejected, not padded:
padding would need masked keys, which no dispatch kernel here takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditserve.services.denoiser.parallel.mesh import SPGroup

# The transformer's keyword arguments that carry tokens, and their token axis (as in diffusers' _cp_plan).
TOKEN_AXES = {"hidden_states": 1, "encoder_hidden_states": 1, "img_ids": 0, "txt_ids": 0}


@dataclass(frozen=True)
class JointSequenceSharder:
    """This rank's slice of the transformer's token inputs, and the gather of the image output."""

    group: SPGroup

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
        for name, dim in TOKEN_AXES.items():
            sharded[name] = self.shard(transformer_kwargs[name], dim, name)
        return sharded

    def gather(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, image tokens / world, channels] on each rank -> the full output on every rank."""
        return self.group.all_gather(image_tokens, dim=1)
