"""Trains the default model: a tiny AutoencoderKL, then a tiny FluxTransformer2DModel on its frozen latents.

The transformer learns exactly what FluxPipeline asks of it at inference: latents normalised with the
VAE's shift_factor and scaling_factor, packed 2x2, image ids of the latent grid, zero text ids,
timestep = sigma (the pipeline passes t / 1000 and the scheduler's t is sigma * 1000), the flow-matching
pair x_t = (1 - sigma) x_0 + sigma noise, target = noise - x_0, and sigmas drawn from the distribution
the sampler visits: uniform, then shifted with the mu FluxPipeline computes for the native token count.
Prompts are dropped to "" 10% of the time so true CFG with an empty negative prompt has an
unconditional prediction to push away from; guidance_embeds stays off (nothing is distilled).

The text encoders stay frozen at tiny_flux's seeded random init, for three reasons:
- every vocabulary word is one token in both tokenizers, so the random embedding tables already give
  each word its own direction, and the random layers mix in word order, which tells a foreground
  colour from a background one: the pooled CLIP vector of "a red circle on a blue background" differs
  from its colour-swapped twin's by 48% of its norm (T5's state of "red" by 7% between the two roles);
- frozen encoders make each prompt's embedding a constant, encoded once (there are about 840 prompts)
  and looked up, so the whole time budget goes to the transformer;
- the shipped encoders are reproducible from the seed alone, the same as `make-tiny-model`'s.

Both phases checkpoint (weights, optimizer, both RNG states, step, losses) every few minutes and
resume from there. The run is deterministic from the seed on a given machine and thread count.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tqdm import tqdm

from ditserve.services.tools.modelgen.tiny_flux import (
    flux_scheduler,
    save_flux_folder,
    text_components,
)
from ditserve.services.tools.training.loop import Batch, Phase, PhaseRunner, load_checkpoint, save_checkpoint, start_run
from ditserve.services.tools.training.shapes import ShapeSpec, render, sample_spec

NATIVE_SIZE = 64
# The longest dataset prompt is 12 T5 tokens with </s>. Pads are not masked in FLUX, so this length is
# part of every embedding the model was trained on: the services must encode with it (ditserve.json).
MAX_SEQUENCE_LENGTH = 16
EMPTY_PROMPT_PROBABILITY = 0.1
TRUE_CFG_SCALE = 3.0
THREADS = 2

# Scale factor 8 (four blocks) and 16 channels, as FLUX's: an 8x8x16 latent, 16 transformer tokens.
# At 1500 steps it reconstructs held-out renders at 34.6 dB against 36.3 dB for scale factor 4 (three
# blocks of the same widths, 4 channels), but its 16 tokens make a transformer step 2.2x cheaper.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": NATIVE_SIZE,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# in_channels (latent channels x 2x2 packing) and the text widths are filled in from the other models.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "guidance_embeds": False,
    # Axis 0 indexes nothing here (text and image ids both leave it 0): it gets the fewest dims.
    "axes_dims_rope": (4, 14, 14),
}
# Per element, against the per-pixel MSE: an autoencoder in effect; the KL only keeps the posterior sane.
KL_WEIGHT = 1e-6
LATENT_STATS_SAMPLES = 256
LATENT_POOL_SIZE = 65536

DITSERVE_DEFAULTS: dict[str, str | int | float] = {
    "family": "flux",
    "prompt_vocabulary": "shapes",  # benches and calibration default to the shapes prompts for this model
    "default_height": NATIVE_SIZE,
    "default_width": NATIVE_SIZE,
    "default_steps": 28,
    "default_max_sequence_length": MAX_SEQUENCE_LENGTH,
    # guidance_embeds is off, so the distilled guidance scale is ignored; true CFG is what steers.
    "default_guidance_scale": 1.0,
    "default_true_cfg_scale": TRUE_CFG_SCALE,
}


VAE_PHASE = Phase("vae", steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=100, bf16=True)
TRANSFORMER_PHASE = Phase("transformer", steps=40000, batch_size=32, learning_rate=1e-3, warmup_steps=500, bf16=False)

# Each phase's streams are seeded with (seed, its index here); latent statistics use 2, the latent pool 3.
PHASES = ("vae", "transformer")


def train_default_model(
    out_dir: Path,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    vae_steps: int = VAE_PHASE.steps,
    transformer_steps: int = TRANSFORMER_PHASE.steps,
    vae_batch_size: int = VAE_PHASE.batch_size,
    transformer_batch_size: int = TRANSFORMER_PHASE.batch_size,
    latent_pool_size: int = LATENT_POOL_SIZE,
    checkpoint_every_s: float = 180.0,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Trains both phases, resuming from checkpoint_dir, and writes the model folder to out_dir.

    checkpoint_dir defaults to out_dir's sibling "<name>.checkpoints", so rerunning the same command
    resumes; out_dir must be absent or empty, and is checked before any training. The shipped weights
    are a CPU run's; device="cuda" runs the same recipe faster, not bit-identically.
    """
    runner = start_run(out_dir, checkpoint_dir, seed, checkpoint_every_s, progress, device, THREADS)
    job = _Job(runner)
    vae = job.train_vae(replace(VAE_PHASE, steps=vae_steps, batch_size=vae_batch_size))
    job.train_transformer(
        replace(TRANSFORMER_PHASE, steps=transformer_steps, batch_size=transformer_batch_size),
        vae,
        latent_pool_size,
    )
    return export_checkpoint(runner.checkpoint_dir, Path(out_dir))


def export_checkpoint(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Writes the model folder from the latest checkpoints: the final export, or a look at a running job."""
    vae = _vae_from(load_checkpoint(Path(checkpoint_dir) / "vae.pt"))
    state = load_checkpoint(Path(checkpoint_dir) / "transformer.pt")
    transformer = FluxTransformer2DModel.from_config(state["config"])
    transformer.load_state_dict(state["model"])
    components = {"vae": vae, "transformer": transformer, **text_components(state["seed"])}
    return save_flux_folder(out_dir, components, DITSERVE_DEFAULTS)


@dataclass(frozen=True)
class _Job:
    runner: PhaseRunner

    @property
    def seed(self) -> int:
        return self.runner.seed

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def progress(self) -> bool:
        return self.runner.progress

    def train_vae(self, phase: Phase) -> AutoencoderKL:
        torch.manual_seed(self.seed)
        vae = AutoencoderKL(**VAE_CONFIG).to(self.device)

        def batch(data_rng: np.random.Generator, noise_rng: torch.Generator, _step: int) -> Batch:
            images = _images([sample_spec(data_rng) for _ in range(phase.batch_size)])
            eps = torch.randn((len(images), vae.config.latent_channels, *_latent_grid(vae)), generator=noise_rng)
            return images.to(self.device), eps.to(self.device)

        def loss(images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.mean + posterior.std * eps).sample
            kl = posterior.kl().mean() / eps[0].numel()
            return F.mse_loss(reconstruction.float(), images) + KL_WEIGHT * kl

        state = self.runner.run(phase, PHASES.index(phase.name), vae, batch, loss)
        if "latent_stats" not in state:  # the phase has just finished: measure its latents once
            state["latent_stats"] = self._latent_stats(vae.eval())
            save_checkpoint(self.runner.checkpoint_dir / "vae.pt", state)
        return _vae_from(state).to(self.device)

    @torch.no_grad()
    def _latent_stats(self, vae: AutoencoderKL) -> tuple[float, float]:
        """FLUX's (shift, scale): one mean, one 1/std over all latent elements, so latents are ~N(0, 1)."""
        rng = np.random.default_rng((self.seed, 2))
        specs = [sample_spec(rng) for _ in range(LATENT_STATS_SAMPLES)]
        latents = torch.cat([self._encode(vae, specs[i : i + 64]) for i in range(0, len(specs), 64)])
        return float(latents.mean()), float(1 / latents.std())

    def _encode(self, vae: AutoencoderKL, specs: list[ShapeSpec]) -> torch.Tensor:
        """Posterior modes, in bf16 as the VAE trained; the pipeline decodes what it made, never a sample."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return vae.encode(_images(specs).to(self.device)).latent_dist.mode().float()

    @torch.no_grad()
    def _latent_pool(self, vae: AutoencoderKL, size: int) -> tuple[torch.Tensor, list[str]]:
        """size renders, encoded once, normalised and packed as FluxPipeline's latents are.

        Encoding every batch afresh would cost a fifth of each transformer step; a pool of tens of
        thousands of jittered renders (dozens per prompt) is as good as an endless stream here.
        """
        rng = np.random.default_rng((self.seed, 3))
        specs = [sample_spec(rng) for _ in range(size)]
        rows, cols = _latent_grid(vae)
        channels = vae.config.latent_channels
        chunks = []
        for start in tqdm(range(0, size, 256), desc="latents", unit="chunk", disable=not self.progress):
            latents = self._encode(vae, specs[start : start + 256])
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            chunks.append(FluxPipeline._pack_latents(latents, len(latents), channels, rows, cols))
        return torch.cat(chunks), [spec.prompt for spec in specs]

    def train_transformer(self, phase: Phase, vae: AutoencoderKL, pool_size: int) -> None:
        if self.runner.finished(phase):  # resumed after it: nothing to set up
            return
        text = text_components(self.seed)
        embed = _PromptEmbeddings(text)
        rows, cols = _latent_grid(vae)
        channels = vae.config.latent_channels
        torch.manual_seed(self.seed)
        transformer = FluxTransformer2DModel(
            **TRANSFORMER_CONFIG,
            in_channels=4 * channels,
            joint_attention_dim=text["text_encoder_2"].config.d_model,
            pooled_projection_dim=text["text_encoder"].config.hidden_size,
        ).to(self.device)
        scheduler = flux_scheduler()
        config = scheduler.config
        mu = calculate_shift(
            (rows // 2) * (cols // 2),
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        image_ids = FluxPipeline._prepare_latent_image_ids(1, rows // 2, cols // 2, self.device, torch.float32)
        text_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3, device=self.device)

        pool, pool_prompts = self._latent_pool(vae, pool_size)
        # Compiled, a step runs 1.4x faster on 2 cores (the model is small enough for op overhead to count);
        # the module itself stays uncompiled, so its state_dict keys are diffusers' own.
        compiled = torch.compile(transformer)

        def batch(data_rng: np.random.Generator, noise_rng: torch.Generator, _step: int) -> Batch:
            drawn = data_rng.integers(len(pool), size=phase.batch_size)
            prompts = ["" if data_rng.random() < EMPTY_PROMPT_PROBABILITY else pool_prompts[i] for i in drawn]
            x0 = pool[torch.from_numpy(drawn)]
            noise = torch.randn(x0.shape, generator=noise_rng).to(self.device)
            sigma = scheduler.time_shift(mu, 1.0, torch.rand(len(drawn), generator=noise_rng)).to(self.device)
            s = sigma[:, None, None]
            embeds, pooled = embed(prompts)
            return (1 - s) * x0 + s * noise, sigma, embeds.to(self.device), pooled.to(self.device), noise - x0

        def loss(
            noisy: torch.Tensor,
            sigma: torch.Tensor,
            embeds: torch.Tensor,
            pooled: torch.Tensor,
            target: torch.Tensor,
        ) -> torch.Tensor:
            prediction = compiled(
                hidden_states=noisy,
                timestep=sigma,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            return F.mse_loss(prediction.float(), target)

        self.runner.run(phase, PHASES.index(phase.name), transformer, batch, loss)


def _vae_from(state: dict[str, Any]) -> AutoencoderKL:
    if "latent_stats" not in state:
        raise RuntimeError("the VAE phase has not finished: its checkpoint has no latent statistics")
    vae = AutoencoderKL.from_config(state["config"])
    vae.load_state_dict(state["model"])
    shift, scale = state["latent_stats"]
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae.eval().requires_grad_(False)


class _PromptEmbeddings:
    """Frozen encoders make a prompt's embedding a constant: encoded once, alone as a served prompt is."""

    def __init__(self, text: dict[str, Any]) -> None:
        # eval(): T5's dropout is on in a freshly built model, and would make embeddings random.
        for name in ("text_encoder", "text_encoder_2"):
            text[name].eval().requires_grad_(False)
        self.pipe = FluxPipeline(scheduler=flux_scheduler(), vae=None, transformer=None, **text)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for prompt in prompts:
            if prompt not in self.cache:
                embeds, pooled, _ = self.pipe.encode_prompt(prompt, max_sequence_length=MAX_SEQUENCE_LENGTH)
                self.cache[prompt] = embeds[0], pooled[0]
        embeds, pooled = zip(*(self.cache[prompt] for prompt in prompts), strict=True)
        return torch.stack(embeds), torch.stack(pooled)


def _images(specs: list[ShapeSpec]) -> torch.Tensor:
    """Renders at the native size into [-1, 1], NCHW: what FluxPipeline's VAE decodes to."""
    pixels = np.stack([np.asarray(render(spec, NATIVE_SIZE), dtype=np.float32) for spec in specs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1


def _latent_grid(vae: AutoencoderKL) -> tuple[int, int]:
    side = NATIVE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    return side, side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (absent or empty)")
    parser.add_argument(
        "--family",
        choices=("flux", "wan"),
        default="flux",
        help="flux: the 64x64 shapes image model (models/shapes-flux); wan: the 9-frame moving-shapes video"
        " model (models/shapes-wan) (default: flux)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="where to checkpoint and resume (default: <out>.checkpoints)"
    )
    parser.add_argument("--vae-steps", type=int, help="(default: the family's recipe)")
    parser.add_argument("--transformer-steps", type=int, help="(default: the family's recipe)")


def run(args: argparse.Namespace) -> int:
    if args.family == "wan":
        from ditserve.services.tools.training import train_wan

        trainer, recipe = train_wan.train_wan_model, (train_wan.VAE_PHASE, train_wan.TRANSFORMER_PHASE)
    else:
        trainer, recipe = train_default_model, (VAE_PHASE, TRANSFORMER_PHASE)
    out = trainer(
        args.out,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        vae_steps=recipe[0].steps if args.vae_steps is None else args.vae_steps,
        transformer_steps=recipe[1].steps if args.transformer_steps is None else args.transformer_steps,
    )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a default shapes model from a seed (resumable).")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
