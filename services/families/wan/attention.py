"""Our attention processor for diffusers' WanTransformer3DModel, calling our one dispatch point.

Why our own processor: the same reasons as FLUX's (families/flux/attention.py): the registry owns the
kernels and their availability, and sequence parallelism replaces one seam. Wan has two attentions per
block: self-attention over the video tokens (with 3D rotary embeddings; `attend`, the seam sequence
parallelism replaces) and cross-attention from the video tokens to the text (`attend_text`: the text is
replicated on every rank, so it stays local under sequence parallelism). The projections come from
diffusers' own helper (`_get_qkv_projections`); with `torch_sdpa` the output is bit-identical to
diffusers' default WanAttnProcessor. Image conditioning (I2V's added K/V) is not served.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel, _get_qkv_projections

from ditserve.services.denoiser.attention.processor import RegistryAttnProcessor
from ditserve.services.denoiser.attention.registry import BackendName, attention


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [batch, tokens, heads, head_dim]: adjacent channel pairs rotate together."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class DitserveWanAttnProcessor(RegistryAttnProcessor):
    def attend_text(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Cross-attention to the text, whose keys every rank holds whole."""
        return attention(query, key, value, self.backend)

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("Wan attention takes no mask here; the dispatch point has no mask argument")
        if attn.add_k_proj is not None:
            raise ValueError("image conditioning (Wan I2V's added K/V) is not served")
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        attend = self.attend if encoder_hidden_states is None else self.attend_text
        hidden_states = attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def apply_attention_backend(transformer: WanTransformer3DModel, backend: BackendName) -> None:
    """Route every attention layer of a WanTransformer3DModel through `backend` (already resolved)."""
    transformer.set_attn_processor(DitserveWanAttnProcessor(backend))
