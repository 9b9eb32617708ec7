"""The base of every family's attention processor: one resolved backend and the seam that calls it."""

from __future__ import annotations

import torch

from ditserve.services.denoiser.attention.registry import BackendName, attention


class RegistryAttnProcessor:
    """A family's diffusers attention processor subclasses this and calls `attend(q, k, v)`, [B, S, H, D].

    `attend` is the seam: sequence-parallel attention replaces it on a rank's shard, everything around it
    (projections, norms, rotary embeddings) stays the family's own.
    """

    def __init__(self, backend: BackendName) -> None:
        if backend is BackendName.AUTO:
            raise ValueError("resolve 'auto' with resolve_backend() before building the processor")
        self.backend = backend

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return attention(query, key, value, self.backend)
