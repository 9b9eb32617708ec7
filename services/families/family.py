"""ModelFamily: everything model-specific the four roles need, loaded from a model folder.

A family package (families/flux/, families/wan/) holds encoder.py, vae.py, attention.py, blocks.py,
parallel.py, runner.py and requests.py; its FAMILY subclasses ModelFamily, sets the facts below, names
the class each role needs as "module.Class" relative to the package, and implements the family-specific
methods (the abstract ones below). Modules are imported on first use, so the encoder never loads the
transformer's code and the registry stays torch-free.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.stage import StageContext
    from ditserve.services.denoiser.attention.registry import BackendName
    from ditserve.services.denoiser.facts import ModelFacts
    from ditserve.services.denoiser.parallel.mesh import SPMesh
    from ditserve.services.denoiser.runner import TransformerRunner
    from ditserve.services.families.base import BlockExecutor, TextEncoder, VaeDecoder
    from ditserve.v1 import encoder_pb2


class ModelFamily(ABC):
    name: str
    cfg_scale_field: str  # the request field that is its classic-CFG scale (needs a negative prompt above 1)
    published_teacache_coefficients: tuple[float, ...] | None  # until `ditserve calibrate teacache` fits the model's
    sp_preload: tuple[str, ...]  # modules a sequence-parallel forkserver imports once
    video: bool  # answers clips (num_frames, fps) rather than images
    package: str  # e.g. "ditserve.services.families.flux"
    text_encoder_class: str  # "encoder.FluxTextEncoder"
    vae_decoder_class: str
    executor_class: str
    parallel_executor_class: str
    runner_class: str
    attention_processor_class: str  # its __init__(backend); set on every attention layer

    def _class(self, spec: str) -> Any:
        module, name = spec.rsplit(".", 1)
        return getattr(importlib.import_module(f"{self.package}.{module}"), name)

    def text_encoder(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        return self._class(self.text_encoder_class)(folder, device, dtype)

    def vae_decoder(self, stage: StageContext) -> VaeDecoder:
        return self._class(self.vae_decoder_class)(stage)

    def load_transformer(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        return folder.load("transformer", device, dtype)

    def attention_head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def apply_attention_backend(self, transformer: torch.nn.Module, backend: BackendName) -> None:
        """Routes every attention layer through `backend` (already resolved) via the family's processor."""
        transformer.set_attn_processor(self._class(self.attention_processor_class)(backend))

    def executor(self, transformer: torch.nn.Module) -> BlockExecutor:
        return self._class(self.executor_class)(transformer)

    def sequence_parallel_executor(
        self, transformer: torch.nn.Module, mesh: SPMesh, backend: BackendName
    ) -> BlockExecutor:
        """An executor over this rank's token shard: full inputs in, the full output out, on every rank."""
        return self._class(self.parallel_executor_class)(transformer, mesh, backend)

    @abstractmethod
    def profiled_blocks(self, transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """Block lists by the name their profiler / NVTX ranges carry."""

    @abstractmethod
    def warmup_prompt(self, transformer: torch.nn.Module, text_tokens: int) -> encoder_pb2.PromptEmbedding:
        """A random embedding shaped like the encoder's at `text_tokens`: `--compile` warms up on it."""

    @abstractmethod
    def attention_tokens(self, transformer: torch.nn.Module, folder: ModelFolder) -> int:
        """Self-attention's sequence length at the folder's default request: the shape `auto` measures."""

    @abstractmethod
    def runner_options(self, transformer: torch.nn.Module, folder: ModelFolder) -> dict[str, Any]:
        """The family runner's own keyword arguments (latent layout, VAE factors), from the configs."""

    @abstractmethod
    def pipeline_conditioning(self, inputs: Any) -> dict[str, Any]:
        """The diffusers pipeline's keywords for a parsed request's own settings: embeddings (the negative
        prompt's too), guidance and CFG scales, the count (and the frames of a video family)."""

    def pipeline_arguments(self, inputs: Any) -> dict[str, Any]:
        """The family's diffusers pipeline call that does the work of `inputs` (its runner's parse): the same
        embeddings, size, steps and guidance, the same noise from a CPU generator at the request's seed; a
        bench gives a peer library exactly what the denoiser was asked."""
        import torch

        return {
            "height": inputs.height,
            "width": inputs.width,
            "num_inference_steps": inputs.steps,
            "generator": torch.Generator("cpu").manual_seed(inputs.seed),
            **self.pipeline_conditioning(inputs),
        }

    def runner(
        self,
        transformer: torch.nn.Module,
        executor: BlockExecutor,
        folder: ModelFolder,
        device: torch.device,
        dtype: torch.dtype,
        facts: ModelFacts,
        on_cache_step: Callable[[str, bool], None] | None = None,
        mirror: Any = None,
        joint_cfg_alone: bool = False,
    ) -> TransformerRunner:
        """The denoiser's runner (a denoiser/runner.py TransformerRunner subclass) for this family."""
        return self._class(self.runner_class)(
            executor,
            folder.load("scheduler"),
            facts,
            device,
            dtype,
            on_cache_step=on_cache_step,
            mirror=mirror,
            joint_cfg_alone=joint_cfg_alone,
            transformer_config=transformer.config,
            **self.runner_options(transformer, folder),
        )
