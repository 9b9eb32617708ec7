"""WanTransformer3DModel's forward split into stages, so a step-cache policy can act between them.

The stages reproduce `WanTransformer3DModel.forward` of diffusers 0.42.1 for text-to-video op for op:
embed() is its prologue (the 3D rotary embedding from the latent grid, the patch embedding flattened to
tokens, the condition embedder's timestep and text embeddings), then the blocks, then finish() (the
output norm modulated by the timestep embedding, proj_out, unpatchify). Running every block therefore
gives the model's own output bit for bit. Not reproduced, because the denoiser passes none of them:
image conditioning (encoder_hidden_states_image, I2V), Wan2.2's per-token timesteps, attention_kwargs,
gradient checkpointing.

Unlike FLUX, the text stream does not change through the blocks (each block cross-attends to the same
text embedding), so run_block returns it untouched and a DBCache suffix never needs its residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ditserve.services.families.executor import StagedExecutor, Tensor


@dataclass(frozen=True)
class WanStepInputs:
    """One transformer call after the embedders."""

    hidden_states: torch.Tensor  # video tokens [batch, frames' * height' * width', inner_dim]
    encoder_hidden_states: torch.Tensor  # text tokens [batch, text_tokens, inner_dim]
    temb: torch.Tensor  # what every block takes: the timestep projection [batch, 6, inner_dim]
    rotary_emb: tuple[torch.Tensor, torch.Tensor]  # cos, sin [1, tokens, 1, head_dim]
    output_temb: torch.Tensor  # the output norm's timestep embedding [batch, inner_dim]
    grid: tuple[int, int, int]  # tokens per axis after patching: frames', height', width'


class WanBlockExecutor(StagedExecutor):
    """Stateless stages of one Wan transformer (a BlockExecutor); per-request cache state lives in the
    denoiser's cache/state.py."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        super().__init__(transformer, tuple(transformer.blocks))

    def embed(
        self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> WanStepInputs:
        """The forward's prologue; takes the keyword arguments the denoiser gives the transformer."""
        model = self.transformer
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        rotary_emb = model.rope(hidden_states)
        tokens = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, encoder_hidden_states, _ = model.condition_embedder(
            timestep, encoder_hidden_states, None, timestep_seq_len=None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        grid = (frames // p_t, height // p_h, width // p_w)
        return WanStepInputs(tokens, encoder_hidden_states, timestep_proj, rotary_emb, temb, grid)

    def cache_signal(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """TeaCache4Wan2.1's indicator: the timestep projection every block modulates with (its e0)."""
        return temb

    def run_block(self, index: int, hidden: Tensor, text: Tensor, temb: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        """Block `index`; the text stream passes through unchanged."""
        return self.blocks[index](hidden, text, temb, rotary), text

    def finish(self, hidden_states: torch.Tensor, inputs: WanStepInputs) -> torch.Tensor:
        """The forward's epilogue: modulated output norm, projection, tokens back to [B, C, F, H, W]."""
        model = self.transformer
        shift, scale = (model.scale_shift_table.to(inputs.output_temb.device) + inputs.output_temb.unsqueeze(1)).chunk(
            2, dim=1
        )
        hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = model.proj_out(hidden_states)
        frames, height, width = inputs.grid
        p_t, p_h, p_w = model.config.patch_size
        hidden_states = hidden_states.reshape(hidden_states.shape[0], frames, height, width, p_t, p_h, p_w, -1)
        return hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
