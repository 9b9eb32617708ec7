"""FLUX's transformer run sequence-parallel: our processor with SP attention, and the sharded stages.

Why not diffusers' own context parallelism (`transformer.enable_parallelism(ContextParallelConfig(...))`):
- It only parallelizes processors of diffusers' dispatcher: `enable_parallelism` hands its config to
  processors that have `_parallel_config` and skips the rest. Ours routes through our registry (see
  attention.py), so its split hooks would cut the inputs while our attention stayed local: silently
  wrong images. Using it means giving up our registry, its availability report and its `auto` rules.
- Its hooks sit on the model's own forward (split inputs at the root, gather at proj_out). Step caching
  calls the stages itself (blocks.py) and bypasses them, so caching and SP could not combine.
- It cannot run on CPU: diffusers 0.42.1's `_resolve_parallel_config` computes
  `rank % torch.accelerator.device_count()`, a ZeroDivisionError without an accelerator (tried here), so
  the gloo tests this feature needs are impossible with it. Its ring also needs an LSE kernel: its default
  `native` backend refuses return_lse and `_native_flash` is FP16/BF16 only.
- Its ring rotates K/V by one all_gather (rotate_method "allgather" is the only one implemented): every
  rank holds all blocks at once and nothing overlaps compute; ours sends one block per hop, overlapped.
- It is marked experimental ("may break without warning") and lives in private modules.
What we take from it: the sharding plan (text and image tokens and their ids split, image output gathered)
and the (ring, ulysses) mesh layout, so the two stay interchangeable if that changes.

How FLUX's joint sequence (text tokens, then image tokens) is split:

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

from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxTransformer2DModel,
)

from ditserve.services.denoiser.attention.registry import BackendName
from ditserve.services.denoiser.parallel.attention import SequenceParallelAttention
from ditserve.services.denoiser.parallel.mesh import SPMesh
from ditserve.services.denoiser.parallel.sharding import SequenceSharder
from ditserve.services.families.flux.attention import DitserveFluxAttnProcessor
from ditserve.services.families.flux.blocks import FluxBlockExecutor, FluxStepInputs

# The transformer's keyword arguments that carry tokens, and their token axis (as in diffusers' _cp_plan).
TOKEN_AXES = {"hidden_states": 1, "encoder_hidden_states": 1, "img_ids": 0, "txt_ids": 0}


class SequenceParallelFluxAttnProcessor(DitserveFluxAttnProcessor):
    """DitserveFluxAttnProcessor on a sequence shard: only the attention call itself changes."""

    def __init__(self, backend: BackendName, mesh: SPMesh) -> None:
        super().__init__(backend)
        self.attend = SequenceParallelAttention(mesh, backend)


class SequenceParallelFluxExecutor(FluxBlockExecutor):
    """FluxBlockExecutor whose stages run on this rank's shard of the joint sequence.

    Every rank passes the same full inputs; embed() keeps this rank's slice (text, image and their ids),
    the blocks attend across ranks, and finish() gathers the image tokens, so every rank returns the full
    output and can advance an identical trajectory. Installs the SP processor on `transformer`.
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        mesh: SPMesh,
        backend: BackendName,
    ) -> None:
        mesh.config.check_heads(transformer.config.num_attention_heads)
        super().__init__(transformer)
        self.mesh = mesh
        self.sharder = SequenceSharder(mesh.world, TOKEN_AXES)
        transformer.set_attn_processor(SequenceParallelFluxAttnProcessor(backend, mesh))

    def forward(self, **transformer_kwargs: Any) -> torch.Tensor:
        """The staged forward: the model's own would run unsharded, with SP attention on full sequences."""
        return self.staged_forward(**transformer_kwargs)

    def embed(self, **transformer_kwargs: Any) -> FluxStepInputs:
        return super().embed(**self.sharder.shard_inputs(transformer_kwargs))

    def finish(self, hidden_states: torch.Tensor, inputs: FluxStepInputs) -> torch.Tensor:
        return self.sharder.gather(super().finish(hidden_states, inputs))

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        return self.sharder.relative_l1(current, previous)
