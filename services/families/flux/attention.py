"""Our attention processor for diffusers' FluxTransformer2DModel, calling our one dispatch point.

Why our own processor rather than diffusers' dispatcher (`transformer.set_attention_backend(...)`):
- Sequence-parallel attention plugs in at `attend` (parallel.py replaces it). With diffusers' dispatcher
  the model's attention calls would never reach that function; diffusers' own context-parallel hooks
  would have to be used instead, tied to its private registry and its release cadence.
- Adding a kernel to diffusers' dispatcher means registering into its private `_AttentionBackendRegistry`,
  whose names, constraints and errors are not ours; our registry owns the availability report and error.
- The processor is small: the projections come from diffusers' own helper (`_get_qkv_projections`, so fused
  QKV keeps working) and rotary embeddings from `apply_rotary_emb`; only the attention call differs from
  FluxAttnProcessor. With `torch_sdpa` the output is bit-identical to diffusers' default processor (the
  same SDPA call on the same permuted tensors); tests/unit/test_attention.py holds both to that.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxTransformer2DModel,
    _get_qkv_projections,
)

from ditserve.services.denoiser.attention.processor import RegistryAttnProcessor
from ditserve.services.denoiser.attention.registry import BackendName


class DitserveFluxAttnProcessor(RegistryAttnProcessor):
    """diffusers' FluxAttnProcessor with the attention call routed through `attention(...)`.

    Double-stream blocks pass the text stream as `encoder_hidden_states`: text and image tokens attend
    jointly (text first) and come back split. Single-stream blocks pass the concatenated sequence alone.
    """

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("FLUX attention takes no mask here; the dispatch point has no mask argument")

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(heads(encoder_query)), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(encoder_key)), key], dim=1)
            value = torch.cat([heads(encoder_value), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value).flatten(2, 3)
        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


# diffusers' FluxAttention.forward reads its processor's signature on every call (to drop keywords the
# processor does not take); a stored signature makes that a lookup: 13 -> 4 us, 240 times a request on
# the shipped image model.
DitserveFluxAttnProcessor.__call__.__signature__ = inspect.signature(DitserveFluxAttnProcessor.__call__)


def apply_attention_backend(transformer: FluxTransformer2DModel, backend: BackendName) -> None:
    """Route every attention layer of a FluxTransformer2DModel through `backend` (already resolved)."""
    transformer.set_attn_processor(DitserveFluxAttnProcessor(backend))
