"""FLUX's rotary position embedding, computed once per set of position ids instead of on every call.

FluxPosEmbed is a pure function of the ids (text then image token positions), and they are the same on
every step of a request and for every request of one size and text length; yet the model recomputes the
embedding (a float64 cos/sin per axis) on each transformer call, cond and uncond alike. Returning the
stored tensors for equal ids is bit for bit what the module would compute.
"""

from __future__ import annotations

import threading

import torch


class RotaryMemo(torch.nn.Module):
    """Wraps a transformer's pos_embed; remembers the results for the last `capacity` distinct ids."""

    def __init__(self, pos_embed: torch.nn.Module, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        super().__init__()
        self.inner = pos_embed
        self.capacity = capacity
        self._entries: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []  # newest first
        self._lock = threading.Lock()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():  # a stored tensor cannot join another call's autograd graph
            return self.inner(ids)
        with self._lock:
            for index, (known, result) in enumerate(self._entries):
                if known.shape == ids.shape and known.device == ids.device and torch.equal(known, ids):
                    self._entries.insert(0, self._entries.pop(index))
                    return result
        result = self.inner(ids)
        with self._lock:
            self._entries = [(ids.clone(), result), *self._entries[: self.capacity - 1]]
        return result


def memoize_rotary(transformer: torch.nn.Module) -> None:
    """Puts a RotaryMemo around the transformer's pos_embed (once)."""
    if not isinstance(transformer.pos_embed, RotaryMemo):
        transformer.pos_embed = RotaryMemo(transformer.pos_embed)
