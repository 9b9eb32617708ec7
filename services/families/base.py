"""What a model family gives the roles: the protocol the denoiser's generic parts are written against.

Torch-free at import (tensors appear only in annotations), so the registry and everything that only
names a family stay importable without torch. A family implements `ModelFamily` in its own package
(families/flux/); nothing outside that package knows the family's classes, tensor names or layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.stage import StageContext
    from ditserve.services.denoiser.attention.registry import BackendName
    from ditserve.services.denoiser.facts import ModelFacts
    from ditserve.services.denoiser.parallel.mesh import SPMesh
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

    def run_block(
        self,
        index: int,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`; returns (hidden, encoder) states."""
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


class ModelFamily(Protocol):
    """Everything model-specific the four roles need, loaded from a model folder."""

    name: str
    cfg_scale_field: str  # the request field that is its classic-CFG scale (needs a negative prompt above 1)
    published_teacache_coefficients: tuple[float, ...] | None
    sp_preload: tuple[str, ...]  # modules a sequence-parallel forkserver imports once

    def text_encoder(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> TextEncoder: ...

    def vae_decoder(self, stage: StageContext) -> VaeDecoder: ...

    def load_transformer(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def attention_head_dim(self, transformer: torch.nn.Module) -> int: ...

    def attention_heads(self, transformer: torch.nn.Module) -> int: ...

    def apply_attention_backend(self, transformer: torch.nn.Module, backend: BackendName) -> None: ...

    def executor(self, transformer: torch.nn.Module) -> BlockExecutor: ...

    def sequence_parallel_executor(
        self, transformer: torch.nn.Module, mesh: SPMesh, backend: BackendName
    ) -> BlockExecutor:
        """An executor over this rank's token shard: full inputs in, the full output out, on every rank."""
        ...

    def profiled_blocks(self, transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """Block lists by the name their profiler / NVTX ranges carry."""
        ...

    def warmup_prompt(self, transformer: torch.nn.Module, text_tokens: int) -> encoder_pb2.PromptEmbedding:
        """A random embedding shaped like the encoder's at `text_tokens`: `--compile` warms up on it."""
        ...

    def runner(
        self,
        transformer: torch.nn.Module,
        executor: BlockExecutor,
        folder: ModelFolder,
        device: torch.device,
        dtype: torch.dtype,
        facts: ModelFacts,
        on_cache_step: Callable[[str, bool], None] | None,
        mirror: Any,
    ) -> Any:
        """The denoiser's runner (denoiser/runner.py's TransformerRunner) for this family."""
        ...
