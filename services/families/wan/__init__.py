"""The Wan2.1 text-to-video family (WanPipeline): UMT5, WanTransformer3DModel, AutoencoderKLWan.

Everything Wan-specific lives in this package: the transformer's forward in stages (blocks.py), its
self- and cross-attention processor (attention.py), its sequence-parallel executor (parallel.py),
request parsing (requests.py), the runner (runner.py), the encoder (encoder.py) and the VAE side
(vae.py). FAMILY is what the registry (families/__init__.py) hands the roles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.stage import StageContext
    from ditserve.services.denoiser.attention.registry import BackendName
    from ditserve.services.denoiser.facts import ModelFacts
    from ditserve.services.denoiser.parallel.mesh import SPMesh
    from ditserve.services.families.wan.blocks import WanBlockExecutor
    from ditserve.services.families.wan.encoder import WanTextEncoder
    from ditserve.services.families.wan.runner import WanRunner
    from ditserve.services.families.wan.vae import WanVaeDecoder
    from ditserve.v1 import encoder_pb2

# TeaCache4Wan2.1's coefficients for Wan2.1-T2V-1.3B with its timestep-projection indicator (e0, the
# "ret steps" variant; ali-vilab/TeaCache, TeaCache4Wan2.1), highest power first. A model's own
# calibration (ditserve.json, `ditserve calibrate teacache`) wins.
WAN21_T2V_1_3B_TEACACHE_COEFFICIENTS: tuple[float, ...] = (
    -5.21862437e04,
    9.23041404e03,
    -5.28275948e02,
    1.36987616e01,
    -4.99875664e-02,
)


class WanFamily:
    name = "wan"
    cfg_scale_field = "guidance_scale"  # classic CFG with a negative prompt, as WanPipeline names it
    published_teacache_coefficients = WAN21_T2V_1_3B_TEACACHE_COEFFICIENTS
    sp_preload = ("diffusers.models.transformers.transformer_wan",)

    def text_encoder(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> WanTextEncoder:
        from ditserve.services.families.wan.encoder import WanTextEncoder

        return WanTextEncoder(folder, device, dtype)

    def vae_decoder(self, stage: StageContext) -> WanVaeDecoder:
        from ditserve.services.families.wan.vae import WanVaeDecoder

        return WanVaeDecoder(stage)

    def load_transformer(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        return folder.load("transformer", device, dtype)

    def attention_head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def apply_attention_backend(self, transformer: torch.nn.Module, backend: BackendName) -> None:
        from ditserve.services.families.wan.attention import apply_attention_backend

        apply_attention_backend(transformer, backend)

    def executor(self, transformer: torch.nn.Module) -> WanBlockExecutor:
        from ditserve.services.families.wan.blocks import WanBlockExecutor

        return WanBlockExecutor(transformer)

    def sequence_parallel_executor(
        self, transformer: torch.nn.Module, mesh: SPMesh, backend: BackendName
    ) -> WanBlockExecutor:
        from ditserve.services.families.wan.parallel import SequenceParallelWanExecutor

        return SequenceParallelWanExecutor(transformer, mesh, backend)

    def profiled_blocks(self, transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        return {"block": list(transformer.blocks)}

    def warmup_prompt(self, transformer: torch.nn.Module, text_tokens: int) -> encoder_pb2.PromptEmbedding:
        import torch

        from ditserve.services.common import tensor_codec
        from ditserve.v1 import encoder_pb2

        embeds = torch.randn(1, text_tokens, transformer.config.text_dim)
        return encoder_pb2.PromptEmbedding(prompt_embeds=tensor_codec.encode(embeds))

    def runner(
        self,
        transformer: torch.nn.Module,
        executor: WanBlockExecutor,
        folder: ModelFolder,
        device: torch.device,
        dtype: torch.dtype,
        facts: ModelFacts,
        on_cache_step: Callable[[str, bool], None] | None = None,
        mirror: Any = None,
    ) -> WanRunner:
        from ditserve.services.families.wan.runner import WanRunner

        config = transformer.config
        vae = folder.config("vae")
        return WanRunner(
            executor,
            folder.load("scheduler"),
            facts,
            device,
            dtype,
            on_cache_step=on_cache_step,
            mirror=mirror,
            latent_channels=config.in_channels,
            spatial_factor=vae.get("scale_factor_spatial", 8),
            temporal_factor=vae.get("scale_factor_temporal", 4),
            patch_size=tuple(config.patch_size),
            transformer_config=config,
        )


FAMILY = WanFamily()
