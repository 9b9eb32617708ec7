"""FLUX's transformer run sequence-parallel: our processor with SP attention, and the sharded stages.

Why not diffusers' own context parallelism (`transformer.enable_parallelism(ContextParallelConfig(...))`):
- It only parallelizes processors of diffusers' dispatcher: `enable_parallelism` hands its config to
  processors that have `_parallel_config` and skips the rest. Ours routes through our registry (see
  attention/flux.py), so its split hooks would cut the inputs while our attention stayed local: silently
  wrong images. Using it means giving up our registry, its availability report and its `auto` rules.
- Its hooks sit on the model's own forward (split inputs at the root, gather at proj_out). Step caching
  calls the stages itself (cache/flux_blocks.py) and bypasses them, so caching and SP could not combine.
- It cannot run on CPU: diffusers 0.42.1's `_resolve_parallel_config` computes
  `rank % torch.accelerator.device_count()`, a ZeroDivisionError without an accelerator (tried here), so
  the gloo tests this feature needs are impossible with it. Its ring also needs an LSE kernel: its default
  `native` backend refuses return_lse and `_native_flash` is FP16/BF16 only.
- Its ring rotates K/V by one all_gather (rotate_method "allgather" is the only one implemented): every
  rank holds all blocks at once and nothing overlaps compute; ours sends one block per hop, overlapped.
- It is marked experimental ("may break without warning") and lives in private modules.
What we take from it: the sharding plan (text and image tokens and their ids split, image output gathered,
see sharding.py) and the (ring, ulysses) mesh layout, so the two stay interchangeable if that changes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import (
    FluxTransformer2DModel,
)

from ditserve.services.denoiser.attention.flux import DitserveFluxAttnProcessor
from ditserve.services.denoiser.attention.registry import BackendName
from ditserve.services.denoiser.cache.flux_blocks import FluxBlockExecutor, FluxStepInputs
from ditserve.services.denoiser.cache.policy import FLUX1_TEACACHE_COEFFICIENTS
from ditserve.services.denoiser.parallel.attention import SequenceParallelAttention
from ditserve.services.denoiser.parallel.mesh import SPMesh
from ditserve.services.denoiser.parallel.sharding import JointSequenceSharder


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
        teacache_coefficients: tuple[float, ...] | None = FLUX1_TEACACHE_COEFFICIENTS,
    ) -> None:
        mesh.config.check_heads(transformer.config.num_attention_heads)
        super().__init__(transformer, teacache_coefficients)
        self.mesh = mesh
        self.sharder = JointSequenceSharder(mesh.world)
        transformer.set_attn_processor(SequenceParallelFluxAttnProcessor(backend, mesh))

    def embed(self, **transformer_kwargs: Any) -> FluxStepInputs:
        return super().embed(**self.sharder.shard_inputs(transformer_kwargs))

    def finish(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.sharder.gather(super().finish(hidden_states, temb))

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """The step cache's distance over the whole sequence, the same float on every rank.

        mean|c - p| / mean|p| over equal shards is the ratio of the summed shards' sums; one all_reduce
        of those two sums gives every rank the same bits, so every rank caches or computes alike.
        """
        sums = torch.stack(
            [(current - previous).abs().sum(dtype=torch.float64), previous.abs().sum(dtype=torch.float64)]
        )
        sums = self.mesh.world.all_reduce(sums)
        return (sums[0] / sums[1]).item()


class SequenceParallelFlux(torch.nn.Module):
    """A FluxTransformer2DModel call, sequence-parallel inside: full inputs in, full output out, per rank."""

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        mesh: SPMesh,
        backend: BackendName,
        teacache_coefficients: tuple[float, ...] | None = FLUX1_TEACACHE_COEFFICIENTS,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.executor = SequenceParallelFluxExecutor(transformer, mesh, backend, teacache_coefficients)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(
        self, return_dict: bool = True, **transformer_kwargs: Any
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        sample = self.executor.forward(**transformer_kwargs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
