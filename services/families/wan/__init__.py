"""The Wan2.1 text-to-video family (WanPipeline): UMT5, WanTransformer3DModel, AutoencoderKLWan.

Everything Wan-specific lives in this package: the transformer's forward in stages (blocks.py), its
self- and cross-attention processor (attention.py), its sequence-parallel executor (parallel.py),
request parsing (requests.py), the runner (runner.py), the encoder (encoder.py) and the VAE side
(vae.py). FAMILY is what the registry (families/__init__.py) hands the roles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ditserve.services.families.family import ModelFamily

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.families.wan.runner import WanInputs
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


class WanFamily(ModelFamily):
    name = "wan"
    video = True
    cfg_scale_field = "guidance_scale"  # classic CFG with a negative prompt, as WanPipeline names it
    published_teacache_coefficients = WAN21_T2V_1_3B_TEACACHE_COEFFICIENTS
    sp_preload = ("diffusers.models.transformers.transformer_wan",)
    package = __name__
    text_encoder_class = "encoder.WanTextEncoder"
    vae_decoder_class = "vae.WanVaeDecoder"
    executor_class = "blocks.WanBlockExecutor"
    parallel_executor_class = "parallel.SequenceParallelWanExecutor"
    runner_class = "runner.WanRunner"
    attention_processor_class = "attention.DitserveWanAttnProcessor"

    def profiled_blocks(self, transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        return {"block": list(transformer.blocks)}

    def warmup_prompt(self, transformer: torch.nn.Module, text_tokens: int) -> encoder_pb2.PromptEmbedding:
        import torch

        from ditserve.services.common import tensor_codec
        from ditserve.v1 import encoder_pb2

        embeds = torch.randn(1, text_tokens, transformer.config.text_dim)
        return encoder_pb2.PromptEmbedding(prompt_embeds=tensor_codec.encode(embeds))

    def attention_tokens(self, transformer: torch.nn.Module, folder: ModelFolder) -> int:
        """Self-attention runs over the clip's video tokens (the text only in cross-attention)."""
        from ditserve.services.families.wan.runner import clip_tokens, latent_grid

        options, defaults = self.runner_options(transformer, folder), folder.defaults
        grid = (defaults.num_frames, defaults.height, defaults.width)
        return clip_tokens(
            latent_grid(*grid, options["temporal_factor"], options["spatial_factor"]), options["patch_size"]
        )

    def runner_options(self, transformer: torch.nn.Module, folder: ModelFolder) -> dict[str, Any]:
        vae = folder.config("vae")
        return {
            "latent_channels": transformer.config.in_channels,
            "spatial_factor": vae.get("scale_factor_spatial", 8),
            "temporal_factor": vae.get("scale_factor_temporal", 4),
            "patch_size": tuple(transformer.config.patch_size),
        }

    def pipeline_conditioning(self, inputs: WanInputs) -> dict[str, Any]:
        return {
            "prompt_embeds": inputs.prompt,
            "negative_prompt_embeds": inputs.negative,
            "guidance_scale": inputs.guidance_scale,
            "num_frames": inputs.num_frames,
            "num_videos_per_prompt": inputs.num_images,
        }


FAMILY = WanFamily()
