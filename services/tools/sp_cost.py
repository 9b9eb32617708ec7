"""Bytes one rank sends per transformer forward under sequence parallelism, by collective.

The same accounting as mesh.py's ByteCounter, in closed form, so the counts measured on a small model
(`ditserve bench sp`) can be checked against it and then carried to full-size shapes. Per attention layer,
with s = batch * sequence / world tokens per rank, h = heads * head_dim, e = bytes per element:
  Ulysses (U ranks): q, k, v and the output each cross one all-to-all:  4 s h e (U - 1) / U
  ring (R ranks):    K and V travel R - 1 hops (Ulysses first: a rank holds U s tokens of h / U):
                                                                         2 s h e (R - 1)
Once per forward, the output's image tokens are all-gathered: (world - 1) * its per-rank bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.services.denoiser.parallel.mesh import SPConfig


@dataclass(frozen=True)
class AttentionShape:
    """What decides the bytes: the attended sequence, its width, how many layers, and the output."""

    sequence: int  # tokens in each self-attention (FLUX: text + image)
    hidden: int  # heads * head_dim
    attention_layers: int  # attention calls per forward that run sequence-parallel
    output_tokens: int  # tokens gathered after the last block (FLUX: image tokens)
    output_features: int  # channels per gathered token
    batch: int = 1
    element_size: int = 2  # bf16


def bytes_per_forward(config: SPConfig, shape: AttentionShape) -> dict[str, int]:
    """Bytes this rank sends in one forward, per collective kind (kinds with no traffic left out)."""
    world = config.world_size
    local = shape.batch * shape.sequence / world * shape.hidden * shape.element_size
    sent = {
        "all_to_all": shape.attention_layers * 4 * local * (config.ulysses - 1) / config.ulysses,
        "shift": shape.attention_layers * 2 * local * (config.ring - 1),
        "all_gather": (world - 1)
        * shape.batch
        * shape.output_tokens
        / world
        * shape.output_features
        * shape.element_size,
    }
    return {kind: round(value) for kind, value in sent.items() if value}
