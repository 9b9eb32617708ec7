"""`ditserve bench sp`: sequence-parallel FLUX on CPU with gloo: error against one process, bytes per step.

For each UxR config, a world of U*R local processes runs one transformer forward (one denoising step) of a
small random FLUX transformer, sequence-parallel, and compares it with the same model's single-process
forward on the same inputs. Every collective goes through the counted groups of parallel/mesh.py, so the
bytes are measured, not estimated; they are checked against the closed form of tools/sp_cost.py, which is
then applied to full-size shapes (docs/sequence-parallel.md turns those bytes into link time).

Rows, one per config: ulysses, ring, world_size, max_abs_error (vs single process, FP32, over ranks),
max_abs_output (the output's scale), bytes_per_step_per_rank (measured, per collective kind, rank 0; all
ranks send alike), bytes_per_step_per_rank_total, bytes_per_step_all_ranks (summed over ranks), and
predicted_bytes_per_step_per_rank (tools/sp_cost.py for this shape).
Summary: max_abs_error (worst config), bytes_match_formula (measured == closed form for every config and
kind), and extrapolated_bytes_per_forward_per_rank: the closed form at full size for each measured config,
per model (FLUX.1-dev at 1024^2, Wan2.1-14B at 720p / 81 frames, Wan2.2-TI2V-5B at 1280x704 / 121 frames;
bf16, batch 1, one forward: CFG models run two per step).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ditserve.services.tools.bench.common import result_document

if TYPE_CHECKING:
    from ditserve.services.denoiser.parallel.mesh import SPMesh

IN_CHANNELS = 16  # packed latent channels of the random model (4 latent channels x 2x2 patch)

# Full-size shapes (tools/sp_cost.py AttentionShape fields) the measured bytes are carried to.
FULL_SIZE = {
    # 512 T5 tokens + (1024/16)^2 image tokens; 19 double + 38 single blocks; 24 heads x 128.
    "FLUX.1-dev 1024x1024": {
        "sequence": 4608,
        "hidden": 3072,
        "attention_layers": 57,
        "output_tokens": 4096,
        "output_features": 64,
    },
    # 21 latent frames x (720/16) x (1280/16) tokens; 40 blocks, 40 heads x 128; text only in cross-attention,
    # whose K/V are the (replicated) text, so only self-attention is exchanged.
    "Wan2.1-14B 1280x720x81": {
        "sequence": 75600,
        "hidden": 5120,
        "attention_layers": 40,
        "output_tokens": 75600,
        "output_features": 64,
    },
    # 31 latent frames x (704/32) x (1280/32) tokens (16x16x4 VAE, 2x2 patches); 30 blocks, 24 heads x 128.
    "Wan2.2-TI2V-5B 1280x704x121": {
        "sequence": 27280,
        "hidden": 3072,
        "attention_layers": 30,
        "output_tokens": 27280,
        "output_features": 192,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="2x1,1x2,2x2", help="comma-separated UxR (Ulysses x ring)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (Ulysses must divide them)")
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--double-blocks", type=int, default=1)
    parser.add_argument("--single-blocks", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16, help="must divide by every world size")
    parser.add_argument(
        "--image-tokens", type=int, default=256, help="must divide by every world size (256: a 256^2 image)"
    )
    parser.add_argument("--backend", default="torch_sdpa", help="attention backend (ring needs an LSE one)")
    parser.add_argument("--seed", type=int, default=0)


def parse_config(text: str) -> tuple[int, int]:
    ulysses, _, ring = text.strip().lower().partition("x")
    return int(ulysses), int(ring)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.services.denoiser.parallel.mesh import SPConfig
    from ditserve.services.tools.sp_cost import AttentionShape, bytes_per_forward
    from ditserve.services.tools.sp_world import run_world

    spec = {
        "heads": args.heads,
        "head_dim": args.head_dim,
        "double_blocks": args.double_blocks,
        "single_blocks": args.single_blocks,
        "text_tokens": args.text_tokens,
        "image_tokens": args.image_tokens,
        "backend": args.backend,
        "seed": args.seed,
    }
    measured_shape = AttentionShape(
        sequence=args.text_tokens + args.image_tokens,
        hidden=args.heads * args.head_dim,
        attention_layers=args.double_blocks + args.single_blocks,
        output_tokens=args.image_tokens,
        output_features=IN_CHANNELS,
        element_size=4,  # FP32 on CPU
    )
    rows, extrapolated = [], {}
    for text in args.configs.split(","):
        config = SPConfig(*parse_config(text))
        ranks = run_world(config, _measure_rank, spec)
        sent = ranks[0]["bytes"]
        predicted = bytes_per_forward(config, measured_shape)
        rows.append(
            {
                "ulysses": config.ulysses,
                "ring": config.ring,
                "world_size": config.world_size,
                "max_abs_error": max(rank["max_abs_error"] for rank in ranks),
                "max_abs_output": ranks[0]["max_abs_output"],
                "bytes_per_step_per_rank": sent,
                "bytes_per_step_per_rank_total": sum(sent.values()),
                "bytes_per_step_all_ranks": sum(sum(rank["bytes"].values()) for rank in ranks),
                "predicted_bytes_per_step_per_rank": predicted,
                "bytes_equal_on_all_ranks": all(rank["bytes"] == sent for rank in ranks),
            }
        )
        for model, shape in FULL_SIZE.items():
            full = bytes_per_forward(config, AttentionShape(**shape))
            extrapolated.setdefault(model, {})[str(config)] = {**full, "total": sum(full.values())}
    summary = {
        "max_abs_error": max(row["max_abs_error"] for row in rows),
        "bytes_match_formula": all(
            row["bytes_per_step_per_rank"] == row["predicted_bytes_per_step_per_rank"]
            and row["bytes_equal_on_all_ranks"]
            for row in rows
        ),
        "extrapolated_bytes_per_forward_per_rank": extrapolated,
    }
    model = (
        f"random FluxTransformer2DModel: {args.heads} heads x {args.head_dim}, "
        f"{args.double_blocks} double + {args.single_blocks} single blocks"
    )
    return result_document("sp", model, {**spec, "dtype": "fp32", "device": "cpu"}, rows, summary)


def _measure_rank(mesh: SPMesh, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: the single-process forward, then the sequence-parallel one on the same model and inputs."""
    import torch

    from ditserve.services.denoiser.attention import BackendName
    from ditserve.services.families.flux.attention import apply_attention_backend
    from ditserve.services.families.flux.parallel import SequenceParallelFluxExecutor
    from ditserve.services.tools.modelgen.tiny_flux import tiny_transformer

    model = tiny_transformer(  # seeded: every rank builds the same weights and inputs
        spec["seed"],
        in_channels=IN_CHANNELS,
        num_layers=spec["double_blocks"],
        num_single_layers=spec["single_blocks"],
        attention_head_dim=spec["head_dim"],
        num_attention_heads=spec["heads"],
    ).eval()
    side = int(spec["image_tokens"] ** 0.5)
    image_ids = torch.zeros(spec["image_tokens"], 3)
    image_ids[:, 1] = torch.arange(spec["image_tokens"]) // side  # FLUX's (0, row, column) ids
    image_ids[:, 2] = torch.arange(spec["image_tokens"]) % side
    inputs = {
        "hidden_states": torch.randn(1, spec["image_tokens"], IN_CHANNELS),
        "encoder_hidden_states": torch.randn(1, spec["text_tokens"], 32),
        "pooled_projections": torch.randn(1, 32),
        "timestep": torch.tensor([0.7]),
        "img_ids": image_ids,
        "txt_ids": torch.zeros(spec["text_tokens"], 3),
    }
    backend = BackendName(spec["backend"])
    with torch.inference_mode():
        apply_attention_backend(model, backend)
        reference = model(**inputs, return_dict=False)[0]
        parallel = SequenceParallelFluxExecutor(model, mesh, backend)
        mesh.counter.reset()
        output = parallel.forward(**inputs)
    return {
        "max_abs_error": (output - reference).abs().max().item(),
        "max_abs_output": reference.abs().max().item(),
        "bytes": dict(mesh.counter.sent),
    }
