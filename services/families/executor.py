"""The part of every family's BlockExecutor that does not depend on the family (families/base.py).

A family subclass says how its transformer embeds, runs one block and finishes; this base gives the
model's own forward for uncached calls, the staged forward the cache and sequence parallelism use, and
the cache's distance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ditserve.services.denoiser.cache.state import relative_l1

Tensor = torch.Tensor


class StagedExecutor(ABC):
    def __init__(self, transformer: torch.nn.Module, blocks: tuple[torch.nn.Module, ...]) -> None:
        self.transformer = transformer
        self.blocks = blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @abstractmethod
    def embed(self, **transformer_kwargs: Any) -> Any:
        """The forward's prologue: the family's StepInputs."""

    @abstractmethod
    def run_block(self, index: int, hidden: Tensor, text: Tensor, temb: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        """Block `index`; returns the (hidden, text) streams."""

    @abstractmethod
    def finish(self, hidden_states: Tensor, inputs: Any) -> Tensor:
        """The forward's epilogue, from the blocks' hidden states and the call's embedded inputs."""

    def relative_l1(self, current: Tensor, previous: Tensor) -> float:
        """The distance cache policies decide on; a sequence-parallel executor reduces it over ranks."""
        return relative_l1(current, previous)

    def forward(self, **transformer_kwargs: Any) -> Tensor:
        """The model's own forward, `transformer(**transformer_kwargs, return_dict=False)[0]`: uncached calls
        go through it, so hooks on it (a calibration's, torch.compile's) see every one."""
        return self.transformer(**transformer_kwargs, return_dict=False)[0]

    def staged_forward(self, **transformer_kwargs: Any) -> Tensor:
        """embed, every block, finish: the model's own output bit for bit, in the stages a cache acts on."""
        inputs = self.embed(**transformer_kwargs)
        hidden, encoder = inputs.hidden_states, inputs.encoder_hidden_states
        for index in range(self.num_blocks):
            hidden, encoder = self.run_block(index, hidden, encoder, inputs.temb, inputs.rotary_emb)
        return self.finish(hidden, inputs)
