"""The FLUX.1 family (FluxPipeline): CLIP + T5 text encoders, FluxTransformer2DModel, AutoencoderKL.

Everything FLUX-specific lives in this package: latent packing and the sigma schedule (latents.py), the
transformer's forward in stages (blocks.py), its attention processor (attention.py), its sequence-parallel
executor (parallel.py), request parsing (requests.py), the runner (runner.py), the encoder (encoder.py)
and the VAE side (vae.py). FAMILY is what the registry (families/__init__.py) hands the roles.
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
    from ditserve.services.families.flux.blocks import FluxBlockExecutor
    from ditserve.services.families.flux.encoder import FluxTextEncoder
    from ditserve.services.families.flux.runner import FluxRunner
    from ditserve.services.families.flux.vae import FluxVaeDecoder
    from ditserve.v1 import encoder_pb2

# TeaCache4FLUX's coefficients for FLUX.1 (ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py), highest
# power first: f(x) = c0 x^4 + c1 x^3 + ... + c4. A model's own calibration (ditserve.json) wins.
FLUX1_TEACACHE_COEFFICIENTS: tuple[float, ...] = (
    4.98651651e02,
    -2.83781631e02,
    5.58554382e01,
    -3.82021401e00,
    2.64230861e-01,
)


class FluxFamily:
    name = "flux"
    cfg_scale_field = "true_cfg_scale"  # classic CFG with a negative prompt; guidance_scale is distilled
    published_teacache_coefficients = FLUX1_TEACACHE_COEFFICIENTS
    sp_preload = ("diffusers.models.transformers.transformer_flux",)

    def text_encoder(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> FluxTextEncoder:
        from ditserve.services.families.flux.encoder import FluxTextEncoder

        return FluxTextEncoder(folder, device, dtype)

    def vae_decoder(self, stage: StageContext) -> FluxVaeDecoder:
        from ditserve.services.families.flux.vae import FluxVaeDecoder

        return FluxVaeDecoder(stage)

    def load_transformer(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        return folder.load("transformer", device, dtype)

    def attention_head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def apply_attention_backend(self, transformer: torch.nn.Module, backend: BackendName) -> None:
        from ditserve.services.families.flux.attention import apply_attention_backend

        apply_attention_backend(transformer, backend)

    def executor(self, transformer: torch.nn.Module) -> FluxBlockExecutor:
        from ditserve.services.families.flux.blocks import FluxBlockExecutor

        return FluxBlockExecutor(transformer)

    def sequence_parallel_executor(
        self, transformer: torch.nn.Module, mesh: SPMesh, backend: BackendName
    ) -> FluxBlockExecutor:
        from ditserve.services.families.flux.parallel import SequenceParallelFluxExecutor

        return SequenceParallelFluxExecutor(transformer, mesh, backend)

    def profiled_blocks(self, transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        return {
            "double_block": list(transformer.transformer_blocks),
            "single_block": list(transformer.single_transformer_blocks),
        }

    def warmup_prompt(self, transformer: torch.nn.Module, text_tokens: int) -> encoder_pb2.PromptEmbedding:
        import torch

        from ditserve.services.common import tensor_codec
        from ditserve.v1 import encoder_pb2

        config = transformer.config
        return encoder_pb2.PromptEmbedding(
            prompt_embeds=tensor_codec.encode(torch.randn(1, text_tokens, config.joint_attention_dim)),
            pooled_prompt_embeds=tensor_codec.encode(torch.randn(1, config.pooled_projection_dim)),
        )

    def runner(
        self,
        transformer: torch.nn.Module,
        executor: FluxBlockExecutor,
        folder: ModelFolder,
        device: torch.device,
        dtype: torch.dtype,
        facts: ModelFacts,
        on_cache_step: Callable[[str, bool], None] | None = None,
        mirror: Any = None,
    ) -> FluxRunner:
        from ditserve.services.families.flux import latents
        from ditserve.services.families.flux.runner import FluxRunner

        config = transformer.config
        return FluxRunner(
            executor,
            folder.load("scheduler"),
            facts,
            device,
            dtype,
            on_cache_step=on_cache_step,
            mirror=mirror,
            vae_scale=latents.vae_scale_factor(folder.config("vae")),
            latent_channels=config.in_channels // 4,
            guidance_embeds=bool(config.guidance_embeds),
            transformer_config=config,
        )


FAMILY = FluxFamily()
