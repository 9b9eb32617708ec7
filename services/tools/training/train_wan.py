"""Trains the default video model: a tiny AutoencoderKLWan, then a tiny WanTransformer3DModel on its latents.

The transformer learns exactly what WanPipeline asks of it at inference: latents normalised per channel
with the VAE's latents_mean and latents_std, unpacked [B, C, F', H/8, W/8], timestep = sigma * 1000 (the
UniPC flow scheduler's t), the flow-matching pair x_t = (1 - sigma) x_0 + sigma noise, target =
noise - x_0, sigmas uniform then shifted by the scheduler's flow_shift (the distribution the sampler
visits), and prompt embeddings as WanPipeline makes them (UMT5, zero past the prompt's tokens). Prompts
are dropped to "" 10% of the time so classic CFG with an empty negative prompt has an unconditional
prediction to push away from.

The UMT5 encoder stays frozen at its seeded random init, as the image model's encoders do (see train.py
for why): every vocabulary word, the directions included, is one token, so the random embedding table
gives each its own direction and the random layers mix in word order.

The VAE's curriculum (VAE_CURRICULUM) goes from single frames to 5-frame clips to the served 9, at about
the same number of frames per step (its 3D convolutions are most of a step on 2 cores), then a second
phase (VAE_CLIP_PHASE) of 9-frame clips only, with its own warm-up and decay:
- single frames first: AutoencoderKLWan encodes a first frame alone, as an image, and learns to draw the
  shapes there five times cheaper per frame than in clips; trained on 5-frame clips from the start it
  was still at the background-only plateau (loss 0.14, 14.4 dB) after 600 steps of 4 clips;
- 5-frame clips then exercise the first-frame and the causal-chunk paths at half the cost of 9;
- only a 9-frame clip shows the decoder a chunk whose causal cache comes from a full chunk: without it
  the later frames came out 6 dB worse than the first ones (measured at step 157);
- after the first phase single frames came back at 27.5 dB but 9-frame clips at 22.2 (held out, the 4x
  layout; the 2x one's clips 23.6 dB), so clips get a phase of their own at a fresh learning rate.
Last, after the transformer, the decoder trains alone (VAE_DECODER_PHASE) on the frozen encoder's latents:
what the transformer learned to make decodes sharper, and nothing it learned moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from tqdm import tqdm
from transformers import UMT5Config, UMT5EncoderModel

from ditserve.services.tools.modelgen.tiny_flux import WORDS, _seeded, _t5_tokenizer, ensure_empty_dir, tiny_t5_config
from ditserve.services.tools.modelgen.tiny_wan import save_wan_folder, wan_scheduler
from ditserve.services.tools.training.loop import Batch, Phase, PhaseRunner, load_checkpoint, save_checkpoint, start_run
from ditserve.services.tools.training.motion import DIRECTIONS, FPS, NUM_FRAMES, ClipSpec, render_clip, sample_clip_spec

NATIVE_SIZE = 64
# (first step, frames per clip) of the VAE's first phase; a batch holds batch_size frames' worth of clips.
VAE_CURRICULUM = ((0, 1), (900, 5), (1400, NUM_FRAMES))
# The longest prompt is 10 UMT5 tokens with </s>; unlike FLUX, WanPipeline zeroes the pad positions.
MAX_SEQUENCE_LENGTH = 16
EMPTY_PROMPT_PROBABILITY = 0.1
GUIDANCE_SCALE = 5.0
DEFAULT_STEPS = 30
THREADS = 2
MOTION_WORDS = ("moving", "still", *DIRECTIONS)

# 8x spatial and 16 channels as Wan2.1's, but 2x temporal where Wan2.1 compresses 4x (the scale its
# temperal_downsample [False, True, True] makes): 9 frames of 64x64 are [16, 5, 8, 8] latents, 80
# transformer tokens with 1x2x2 patches. At 4x a latent frame after the first stands for 4 frames of a
# shape moving 2-3 px a frame, and the first model trained that way (the 4x layout, 52 min of VAE
# training) reconstructed held-out clips at only 24.5 dB, its judge recognising the shape on 23% of
# them; 2x halves what a latent frame must draw. Side by side, both fine-tuned 8 min on 9-frame clips
# (1 thread, lr 3e-4) from that model's first-phase checkpoint, the 2x layout reached 20.9 dB held out
# against 20.3 for the 4x one it was trained in, after 263 steps against 340; trained by this recipe it
# reconstructs held-out clips at 25.8 dB after its clip phase, the judge recognising the shape on 97% of
# them (of the smaller shapes of the second cut, 26.3 dB and 50%: see motion.py), and at 28.4 dB, 99.8%,
# after the decoder phase.
# The layout inside is the option AutoencoderKLWan carries for Wan2.2's VAE: the input patchified 2x2
# (12 channels at 32x32, so no convolution runs at full size) and parameter-free shortcuts around each
# resampling (is_residual), which let it be 32 wide for the cost of Wan2.1's layout at 12. Measured side
# by side on single frames (1 thread, 16 a step, lr 3e-4, 5 min): Wan2.1's layout at base 12 reached
# 13.2 dB held out, Wan2.2's 16.4; Wan2.1's layout with the same patch and width but no shortcuts 12.0.
# Trained with Wan2.1's layout for 1000 steps it was still at 19.3 dB.
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 32,
    "z_dim": 16,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True],
    "scale_factor_temporal": 2,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
}
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}
# The VAE decodes its posterior's mode, as WanPipeline only ever decodes what the transformer made: with
# a sampled latent (std 1 at init) it learned 4x slower here. Per element, against the per-pixel MSE, the
# KL only keeps the means bounded.
KL_WEIGHT = 1e-6
LATENT_STATS_SAMPLES = 128
LATENT_POOL_SIZE = 8192

DITSERVE_DEFAULTS: dict[str, str | int | float] = {
    "family": "wan",
    "prompt_vocabulary": "moving-shapes",  # benches and calibration default to the motion prompts
    "default_height": NATIVE_SIZE,
    "default_width": NATIVE_SIZE,
    "default_num_frames": NUM_FRAMES,
    "default_fps": FPS,
    "default_steps": DEFAULT_STEPS,
    "default_guidance_scale": GUIDANCE_SCALE,
    "default_max_sequence_length": MAX_SEQUENCE_LENGTH,
}

# lr 3e-4, not the image VAE's 1e-3: at 1e-3 this VAE sat above the background-only loss (~0.16) for
# 400+ steps; at 3e-4 it was at 0.13 by step 125 (single frames, 16 a step, measured side by side).
# Shape is the last thing a transformer learns here, and it takes samples: the image model's own
# transformer trained 3000 steps of 16 on its shipped VAE judged 24% on shape (chance) with colour and
# background at 100%, as this one did (25% at 3000 steps, 20% at the first recipe's 8000 of 16); the image
# model draws shapes after 40000 steps of 32. Alone on 2 cores the VAE phases take 22 minutes and a
# transformer step of 16 clips about 85 ms, so the transformer gets 30000 steps (42 min) from a pool of
# 8192 clips. (Before the shapes grew, a decoder fine-tuned alone to 77% of its reconstructions right on
# shape left the generated clips at chance: the transformer, not only the VAE, was short.)
VAE_PHASE = Phase("vae", steps=1700, batch_size=18, learning_rate=3e-4, warmup_steps=50, bf16=False)
VAE_CLIP_PHASE = Phase("vae_clips", steps=1200, batch_size=18, learning_rate=3e-4, warmup_steps=50, bf16=False)
TRANSFORMER_PHASE = Phase("transformer", steps=30000, batch_size=16, learning_rate=1e-3, warmup_steps=300, bf16=False)
# Last, the decoder alone on the frozen encoder's latents, so the transformer's latent space stays as it
# learned it: 3000 steps of 2 clips (19 min) took held-out clips from 25.8 to 28.4 dB and the judge from
# 97.8% to 99.8% of the reconstructions right; 1500 steps (8 min) reached 27.5 dB, flat from step 1300 as
# its cosine decay ran out. At a constant 3e-4 (the VAE's rate) it lost 0.4 dB in 600 steps; 1e-4 with
# the usual warm-up and cosine decay gains steadily. The gains are the small batch's noise averaged out,
# not capacity: a wider decoder (decoder_base_dim 48) would not fit models/ under 40 MB.
VAE_DECODER_PHASE = Phase("vae_decoder", steps=3000, batch_size=18, learning_rate=1e-4, warmup_steps=50, bf16=False)
# Each phase's streams are seeded with (seed, its index here); latent statistics use 3, the latent pool 4,
# the decoder phase (added after them) 5.
PHASES = ("vae", "vae_clips", "transformer")
LATENT_STATS_STREAM, LATENT_POOL_STREAM, VAE_DECODER_STREAM = 3, 4, 5


def text_components(seed: int) -> dict[str, Any]:
    """The tokenizer (the shapes words plus the motion words) and the seeded, frozen UMT5 encoder."""
    tokenizer = _t5_tokenizer((*WORDS, *MOTION_WORDS))
    encoder = _seeded(seed, lambda: UMT5EncoderModel(tiny_t5_config(UMT5Config, tokenizer)))
    return {"tokenizer": tokenizer, "text_encoder": encoder.eval().requires_grad_(False)}


def train_wan_model(
    out_dir: Path,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    vae_steps: int = VAE_PHASE.steps,
    vae_clip_steps: int = VAE_CLIP_PHASE.steps,
    transformer_steps: int = TRANSFORMER_PHASE.steps,
    vae_decoder_steps: int = VAE_DECODER_PHASE.steps,
    vae_batch_size: int = VAE_PHASE.batch_size,
    transformer_batch_size: int = TRANSFORMER_PHASE.batch_size,
    latent_pool_size: int = LATENT_POOL_SIZE,
    checkpoint_every_s: float = 180.0,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Trains every phase, resuming from checkpoint_dir, and writes the model folder to out_dir
    (absent or empty; checked first). checkpoint_dir defaults to "<out>.checkpoints"."""
    runner = start_run(out_dir, checkpoint_dir, seed, checkpoint_every_s, progress, device, THREADS)
    # Denormal gradients make the VAE's backward 10-20x slower on CPU; flushing them costs nothing here.
    torch.set_flush_denormal(True)
    job = _WanJob(runner)
    vae = job.train_vae(
        replace(VAE_PHASE, steps=vae_steps, batch_size=vae_batch_size),
        replace(VAE_CLIP_PHASE, steps=vae_clip_steps, batch_size=vae_batch_size),
    )
    job.train_transformer(
        replace(TRANSFORMER_PHASE, steps=transformer_steps, batch_size=transformer_batch_size),
        vae,
        latent_pool_size,
    )
    job.tune_decoder(replace(VAE_DECODER_PHASE, steps=vae_decoder_steps, batch_size=vae_batch_size))
    return export_wan_checkpoint(runner.checkpoint_dir, Path(out_dir))


def export_wan_checkpoint(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Writes the model folder from the latest checkpoints: the final export, or a look at a running job
    (whose decoder, before its own phase, is the clip phase's)."""
    out_dir = Path(out_dir)
    ensure_empty_dir(out_dir)
    vae = vae_from(load_checkpoint(Path(checkpoint_dir) / f"{VAE_CLIP_PHASE.name}.pt"))
    decoder = Path(checkpoint_dir) / f"{VAE_DECODER_PHASE.name}.pt"
    if decoder.exists():  # the whole VAE's weights, its encoder the clip phase's, unchanged
        vae.load_state_dict(load_checkpoint(decoder)["model"])
    state = load_checkpoint(Path(checkpoint_dir) / "transformer.pt")
    transformer = WanTransformer3DModel.from_config(state["config"])
    transformer.load_state_dict(state["model"])
    pipe = WanPipeline(vae=vae, transformer=transformer, scheduler=wan_scheduler(), **text_components(state["seed"]))
    return save_wan_folder(out_dir, pipe, DITSERVE_DEFAULTS)


def clips_tensor(specs: list[ClipSpec], num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Renders into [-1, 1], [B, 3, F, H, W]: what AutoencoderKLWan encodes and decodes."""
    clips = np.stack(
        [
            np.stack([np.asarray(frame, dtype=np.float32) for frame in render_clip(spec, NATIVE_SIZE, num_frames)])
            for spec in specs
        ]
    )
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3) / 127.5 - 1


def vae_from(state: dict[str, Any]) -> AutoencoderKLWan:
    if "latent_stats" not in state:
        raise RuntimeError("the VAE phase has not finished: its checkpoint has no latent statistics")
    vae = AutoencoderKLWan.from_config(state["config"])
    vae.load_state_dict(state["model"])
    mean, std = state["latent_stats"]
    vae.register_to_config(latents_mean=list(mean), latents_std=list(std))
    return vae.eval().requires_grad_(False)


@dataclass(frozen=True)
class _WanJob:
    runner: PhaseRunner

    def train_vae(self, phase: Phase, clip_phase: Phase) -> AutoencoderKLWan:
        """The curriculum phase, then the 9-frame phase from its weights; latents measured after both."""
        torch.manual_seed(self.runner.seed)
        vae = AutoencoderKLWan(**VAE_CONFIG).to(self.runner.device)

        def batches(curriculum: tuple[tuple[int, int], ...], batch_size: int) -> Callable[..., Batch]:
            def batch(data_rng: np.random.Generator, _noise_rng: torch.Generator, step: int) -> Batch:
                frames = [count for first, count in curriculum if step >= first][-1]
                specs = [sample_clip_spec(data_rng) for _ in range(max(1, batch_size // frames))]
                return (clips_tensor(specs, frames).to(self.runner.device),)

            return batch

        def loss(clips: torch.Tensor) -> torch.Tensor:
            posterior = vae.encode(clips).latent_dist
            latents = posterior.mode()
            reconstruction = vae.decode(latents).sample
            kl = posterior.kl().mean() / latents[0].numel()
            return F.mse_loss(reconstruction.float(), clips) + KL_WEIGHT * kl

        self.runner.run(phase, PHASES.index(phase.name), vae, batches(VAE_CURRICULUM, phase.batch_size), loss)
        clips_only = ((0, NUM_FRAMES),)
        state = self.runner.run(
            clip_phase, PHASES.index(clip_phase.name), vae, batches(clips_only, clip_phase.batch_size), loss
        )
        if "latent_stats" not in state:  # the phase has just finished: measure its latents once
            state["latent_stats"] = self._latent_stats(vae.eval())
            save_checkpoint(self.runner.checkpoint_dir / f"{clip_phase.name}.pt", state)
        return vae_from(state).to(self.runner.device)

    def tune_decoder(self, phase: Phase) -> None:
        """The decoder (and post_quant_conv) alone on 9-frame clips, the encoder frozen, so every latent
        the transformer learned on decodes as before, only sharper; the latent statistics stand."""
        vae = vae_from(load_checkpoint(self.runner.checkpoint_dir / f"{VAE_CLIP_PHASE.name}.pt"))
        vae = vae.to(self.runner.device).train()
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)

        def batch(data_rng: np.random.Generator, _noise_rng: torch.Generator, _step: int) -> Batch:
            specs = [sample_clip_spec(data_rng) for _ in range(max(1, phase.batch_size // NUM_FRAMES))]
            clips = clips_tensor(specs).to(self.runner.device)
            return clips, vae.encode(clips).latent_dist.mode()  # batch() runs without gradients

        def loss(clips: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(vae.decode(latents).sample.float(), clips)

        self.runner.run(phase, VAE_DECODER_STREAM, vae, batch, loss)

    @torch.no_grad()
    def _latent_stats(self, vae: AutoencoderKLWan) -> tuple[list[float], list[float]]:
        """Wan's per-channel latents_mean and latents_std, so normalised latents are ~N(0, 1) per channel."""
        rng = np.random.default_rng((self.runner.seed, LATENT_STATS_STREAM))
        latents = self._encode(vae, [sample_clip_spec(rng) for _ in range(LATENT_STATS_SAMPLES)])
        per_channel = latents.transpose(0, 1).flatten(1)
        return per_channel.mean(1).tolist(), per_channel.std(1).tolist()

    def _encode(self, vae: AutoencoderKLWan, specs: list[ClipSpec]) -> torch.Tensor:
        """Posterior modes of 9-frame clips, 32 at a time; the pipeline decodes what it made, never a sample."""
        chunks = [
            vae.encode(clips_tensor(specs[i : i + 32]).to(self.runner.device)).latent_dist.mode()
            for i in range(0, len(specs), 32)
        ]
        return torch.cat(chunks).float()

    @torch.no_grad()
    def _latent_pool(self, vae: AutoencoderKLWan, size: int) -> tuple[torch.Tensor, list[str]]:
        """size clips, encoded once and normalised as WanPipeline's latents are (see train.py for why)."""
        rng = np.random.default_rng((self.runner.seed, LATENT_POOL_STREAM))
        specs = [sample_clip_spec(rng) for _ in range(size)]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        chunks = []
        for start in tqdm(range(0, size, 256), desc="latents", unit="chunk", disable=not self.runner.progress):
            chunks.append((self._encode(vae, specs[start : start + 256]).cpu() - mean) / std)
        return torch.cat(chunks), [spec.prompt for spec in specs]

    def train_transformer(self, phase: Phase, vae: AutoencoderKLWan, pool_size: int) -> None:
        if self.runner.finished(phase):  # resumed after it: nothing to set up
            return
        device = self.runner.device
        text = text_components(self.runner.seed)
        embed = _PromptEmbeddings(text)
        torch.manual_seed(self.runner.seed)
        transformer = WanTransformer3DModel(
            **TRANSFORMER_CONFIG,
            in_channels=vae.config.z_dim,
            out_channels=vae.config.z_dim,
            text_dim=text["text_encoder"].config.d_model,
        ).to(device)
        shift = wan_scheduler().config.flow_shift
        pool, pool_prompts = self._latent_pool(vae, pool_size)
        # Compiled for speed; the module itself stays uncompiled, so its state_dict keys are diffusers' own.
        compiled = torch.compile(transformer)

        def batch(data_rng: np.random.Generator, noise_rng: torch.Generator, _step: int) -> Batch:
            drawn = data_rng.integers(len(pool), size=phase.batch_size)
            prompts = ["" if data_rng.random() < EMPTY_PROMPT_PROBABILITY else pool_prompts[i] for i in drawn]
            x0 = pool[torch.from_numpy(drawn)]
            noise = torch.randn(x0.shape, generator=noise_rng)
            u = torch.rand(len(drawn), generator=noise_rng)
            sigma = shift * u / (1 + (shift - 1) * u)
            s = sigma.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            return noisy.to(device), (sigma * 1000).to(device), embed(prompts).to(device), (noise - x0).to(device)

        def loss(
            noisy: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, target: torch.Tensor
        ) -> torch.Tensor:
            prediction = compiled(
                hidden_states=noisy, timestep=timestep, encoder_hidden_states=embeds, return_dict=False
            )[0]
            return F.mse_loss(prediction.float(), target)

        self.runner.run(phase, PHASES.index(phase.name), transformer, batch, loss)


class _PromptEmbeddings:
    """The frozen encoder makes a prompt's embedding a constant: encoded once, alone as a served prompt is."""

    def __init__(self, text: dict[str, Any]) -> None:
        self.pipe = WanPipeline(scheduler=wan_scheduler(), vae=None, transformer=None, **text)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for prompt in prompts:
            if prompt not in self.cache:
                embeds, _ = self.pipe.encode_prompt(
                    prompt, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
                )
                self.cache[prompt] = embeds[0]
        return torch.stack([self.cache[prompt] for prompt in prompts])
