"""Wan's transformer run sequence-parallel: video tokens sharded, text replicated.

embed() runs the prologue on the full latents (the patch embedding and the rotary table are cheap next
to the blocks) and keeps this rank's contiguous slice of the video tokens and of their 3D rotary
cos/sin, so every token keeps its own (frame, row, column) rotation. Self-attention runs across ranks
(Ulysses, ring or both); cross-attention attends to the whole text, which every rank holds: Wan's text
stream never changes through the blocks, so sharding it would save nothing and cost an exchange per
block. finish() gathers the video tokens before the output projection, so every rank returns the full
output and advances an identical trajectory. The token count (frames' x height' x width' after
patching) must divide by the world size; uneven counts are refused up front, not padded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ditserve.services.denoiser.attention.registry import BackendName
from ditserve.services.denoiser.parallel.attention import SequenceParallelAttention
from ditserve.services.denoiser.parallel.mesh import SPMesh
from ditserve.services.denoiser.parallel.sharding import SequenceSharder
from ditserve.services.families.wan.attention import DitserveWanAttnProcessor
from ditserve.services.families.wan.blocks import WanBlockExecutor, WanStepInputs


class SequenceParallelWanAttnProcessor(DitserveWanAttnProcessor):
    """Self-attention across ranks; cross-attention stays local."""

    def __init__(self, backend: BackendName, mesh: SPMesh) -> None:
        super().__init__(backend)
        self.attend = SequenceParallelAttention(mesh, backend)


class SequenceParallelWanExecutor(WanBlockExecutor):
    def __init__(self, transformer: WanTransformer3DModel, mesh: SPMesh, backend: BackendName) -> None:
        mesh.config.check_heads(transformer.config.num_attention_heads)
        super().__init__(transformer)
        self.sharder = SequenceSharder(mesh.world, {})
        transformer.set_attn_processor(SequenceParallelWanAttnProcessor(backend, mesh))

    def forward(self, **transformer_kwargs: Any) -> torch.Tensor:
        """The staged forward: the model's own would run unsharded."""
        return self.staged_forward(**transformer_kwargs)

    def embed(self, **transformer_kwargs: Any) -> WanStepInputs:
        inputs = super().embed(**transformer_kwargs)
        cos, sin = inputs.rotary_emb
        shard = self.sharder.shard
        return dataclasses.replace(
            inputs,
            hidden_states=shard(inputs.hidden_states, 1, "the video"),
            rotary_emb=(shard(cos, 1, "the rotary table"), shard(sin, 1, "the rotary table")),
        )

    def finish(self, hidden_states: torch.Tensor, inputs: WanStepInputs) -> torch.Tensor:
        return super().finish(self.sharder.gather(hidden_states), inputs)

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        return self.sharder.relative_l1(current, previous)
