"""The FLUX.1 family (FluxPipeline): CLIP + T5 text encoders, FluxTransformer2DModel, AutoencoderKL.

Everything FLUX-specific lives in this package: latent packing and the sigma schedule (latents.py), the
transformer's forward in stages (blocks.py), its attention processor (attention.py), its sequence-parallel
executor (parallel.py), request parsing (requests.py), the runner (runner.py), the encoder (encoder.py)
and the VAE side (vae.py). FAMILY is what the registry (families/__init__.py) hands the roles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ditserve.services.families.family import ModelFamily

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.families.flux.runner import FluxInputs
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


class FluxFamily(ModelFamily):
    name = "flux"
    video = False
    cfg_scale_field = "true_cfg_scale"  # classic CFG with a negative prompt; guidance_scale is distilled
    published_teacache_coefficients = FLUX1_TEACACHE_COEFFICIENTS
    sp_preload = ("diffusers.models.transformers.transformer_flux",)
    package = __name__
    text_encoder_class = "encoder.FluxTextEncoder"
    vae_decoder_class = "vae.FluxVaeDecoder"
    executor_class = "blocks.FluxBlockExecutor"
    parallel_executor_class = "parallel.SequenceParallelFluxExecutor"
    runner_class = "runner.FluxRunner"
    attention_processor_class = "attention.DitserveFluxAttnProcessor"

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

    def attention_tokens(self, transformer: torch.nn.Module, folder: ModelFolder) -> int:
        """Joint attention runs over the text tokens (padded to max_sequence_length) and the image tokens."""
        from ditserve.services.families.flux import latents

        defaults, scale = folder.defaults, latents.vae_scale_factor(folder.config("vae"))
        return defaults.max_sequence_length + latents.image_tokens(defaults.height, defaults.width, scale)

    def runner_options(self, transformer: torch.nn.Module, folder: ModelFolder) -> dict[str, Any]:
        from ditserve.services.families.flux import latents

        return {
            "vae_scale": latents.vae_scale_factor(folder.config("vae")),
            "latent_channels": transformer.config.in_channels // 4,  # packed 2x2
            "guidance_embeds": bool(transformer.config.guidance_embeds),
        }

    def pipeline_conditioning(self, inputs: FluxInputs) -> dict[str, Any]:
        negative = inputs.negative
        return {
            "prompt_embeds": inputs.prompt.embeds,
            "pooled_prompt_embeds": inputs.prompt.pooled,
            "negative_prompt_embeds": None if negative is None else negative.embeds,
            "negative_pooled_prompt_embeds": None if negative is None else negative.pooled,
            "true_cfg_scale": inputs.true_cfg_scale,
            "guidance_scale": inputs.guidance_scale,
            "num_images_per_prompt": inputs.num_images,
        }


FAMILY = FluxFamily()
