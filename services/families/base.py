"""What a model family gives the roles: the protocol the denoiser's generic parts are written against.

Torch-free at import (tensors appear only in annotations), so the registry and everything that only
names a family stay importable without torch. A family implements `ModelFamily` in its own package
(families/flux/); nothing outside that package knows the family's classes, tensor names or layouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ditserve.v1 import encoder_pb2


class StepInputs(Protocol):
    """One transformer call after its embedders: what every block takes."""

    hidden_states: torch.Tensor  # the latent tokens [batch, tokens, inner_dim]
    encoder_hidden_states: torch.Tensor  # the text tokens [batch, text_tokens, inner_dim]
    temb: torch.Tensor  # the timestep (and guidance / pooled text) embedding
    rotary_emb: Any  # the rotary embedding the blocks apply to q and k


class BlockExecutor(Protocol):
    """A transformer's forward split into stages, so a step cache can act between them.

    Running embed, every block and finish must give the model's own forward bit for bit; cache/state.py
    runs a prefix, maybe a middle and a suffix of the blocks, and reuses residuals in between.
    """

    num_blocks: int

    def embed(self, **transformer_kwargs: Any) -> StepInputs:
        """The forward's prologue, from the keyword arguments the runner gives the transformer."""
        ...

    def cache_signal(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """TeaCache's input signal: what the first block would see, without running it."""
        ...

    def run_block(self, index: int, hidden: Tensor, text: Tensor, temb: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        """Block `index`; returns the (hidden, text) streams."""
        ...

    def finish(self, hidden_states: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """The forward's epilogue: the model output (the noise prediction), from the blocks' hidden states
        and the call's embedded inputs (their timestep embedding, the family's output layout)."""
        ...

    def forward(self, **transformer_kwargs: Any) -> torch.Tensor:
        """Every block, no caching: the transformer's own output."""
        ...

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """The distance cache policies decide on; sequence parallelism reduces it over ranks."""
        ...


class TextEncoder(Protocol):
    """The encoder role's model: prompts in, the family's embedding message out."""

    max_sequence_length: int

    def encode(self, prompt: str, sequence_length: int) -> encoder_pb2.PromptEmbedding: ...


class VaeDecoder(Protocol):
    """The VAE role's model: the denoiser's latents in, uint8 pixels out.

    An image family (video = False) decodes to [batch, height, width, 3]; a video family (video = True,
    with a temporal_factor) takes a num_frames argument too and decodes to [batch, frames, height, width, 3].
    """

    scale_factor: int
    video: bool
    vae: torch.nn.Module  # the diffusers VAE itself (enable_tiling() bounds decode memory)

    def check_latents(self, latents: torch.Tensor, height: int, width: int, *num_frames: int) -> None:
        """Raises InvalidArgument naming `latents.shape` when it is not what the denoiser makes."""
        ...

    def decode(self, latents: torch.Tensor, height: int, width: int, *num_frames: int) -> Any: ...
