"""FluxTransformer2DModel's forward split into stages, so a step-cache policy can act between them.

The stages reproduce `FluxTransformer2DModel.forward` of diffusers 0.42.1 op for op: embed() is its
prologue (x_embedder, the time/guidance/text embedder, context_embedder, the rotary pos_embed), then
the blocks, then finish() (norm_out, proj_out). Running every block therefore gives the model's own
output bit for bit. Not reproduced, because the denoiser passes none of them: ControlNet residuals,
IP-Adapter embeddings, joint_attention_kwargs (so no LoRA scale), gradient checkpointing, and hooks on
the model's own forward (diffusers' enable_cache, a context-parallel plan), which calling the stages
bypasses. Attention processors live on the blocks, so a backend set with apply_attention_backend holds.

Block list: the double-stream transformer_blocks, then the single-stream single_transformer_blocks, as
one sequence of num_layers + num_single_layers blocks (19 + 38 = 57 in FLUX.1). In diffusers 0.42.1
both kinds take (hidden_states, encoder_hidden_states) and return (encoder_hidden_states,
hidden_states), so one (image, text) pair of streams flows through the whole sequence. DBCache's Fn
counts from its start (the first double block) and Bn back from its end (the last single block), and
either may cross from one kind to the other: Fn 20 in FLUX.1 is all 19 double blocks and 1 single one.
This is cache-dit's default Flux adapter (caching/block_adapters/adapters.py, which caches
transformer_blocks + single_transformer_blocks as one list of one forward pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from ditserve.services.families.executor import StagedExecutor, Tensor
from ditserve.services.families.flux.rotary import memoize_rotary


@dataclass(frozen=True)
class FluxStepInputs:
    """One transformer call after the embedders: the two streams and what every block also takes."""

    hidden_states: torch.Tensor  # image tokens [batch, image_tokens, inner_dim]
    encoder_hidden_states: torch.Tensor  # text tokens [batch, text_tokens, inner_dim]
    temb: torch.Tensor  # [batch, inner_dim]
    rotary_emb: tuple[torch.Tensor, torch.Tensor]


class FluxBlockExecutor(StagedExecutor):
    """Stateless stages of one FLUX transformer (a BlockExecutor); per-request cache state lives in the
    denoiser's cache/state.py."""

    def __init__(self, transformer: FluxTransformer2DModel) -> None:
        super().__init__(transformer, (*transformer.transformer_blocks, *transformer.single_transformer_blocks))
        self.num_double_blocks = len(transformer.transformer_blocks)
        memoize_rotary(transformer)  # the model's own forward (uncached calls) takes it too

    def embed(
        self,
        *,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> FluxStepInputs:
        """The forward's prologue; takes the keyword arguments the denoiser gives the transformer."""
        if txt_ids.ndim != 2 or img_ids.ndim != 2:
            raise ValueError("txt_ids and img_ids must be 2-d [tokens, 3], as diffusers expects them now")
        model = self.transformer
        hidden_states = model.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled_projections)
        else:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = model.time_text_embed(timestep, guidance, pooled_projections)
        encoder_hidden_states = model.context_embedder(encoder_hidden_states)
        image_rotary_emb = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return FluxStepInputs(hidden_states, encoder_hidden_states, temb, image_rotary_emb)

    def cache_signal(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """TeaCache's indicator: the first double block's norm1 output, without running the block."""
        return self.transformer.transformer_blocks[0].norm1(hidden_states, emb=temb)[0]

    def run_block(self, index: int, hidden: Tensor, text: Tensor, temb: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        """Block `index` of the double-then-single sequence; returns (hidden, encoder) states."""
        text, hidden = self.blocks[index](
            hidden_states=hidden,
            encoder_hidden_states=text,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs=None,
        )
        return hidden, text

    def finish(self, hidden_states: torch.Tensor, inputs: FluxStepInputs) -> torch.Tensor:
        """The forward's epilogue: only the image stream leaves the blocks."""
        return self.transformer.proj_out(self.transformer.norm_out(hidden_states, inputs.temb))
