"""`ditserve bench transport`: what the wire costs.

(a) Tensor codec throughput at FLUX.1-dev sizes, including protobuf
serialization (what gRPC does with the message): encode = tensor -> Tensor ->
bytes, decode = bytes -> Tensor -> tensor view.
(b) End-to-end latency of the four-service path against what a user would otherwise
run: the family's diffusers pipeline (reference.py) doing exactly the request's work
(the model's defaults, CFG and negative prompt included), same prompt, seed, size and
steps, runs interleaved. The headline ratio is against diffusers at its defaults (no
OpenMP variables, as a user runs it); the same-policy ratio, against diffusers under the
services' OpenMP setting (client/config.py's services_openmp), is reported beside it. Any output that
differs between the sides fails the bench: the times then compare different work. A second stack
under the denoiser's --joint-cfg always (a request alone runs both CFG branches in one call) is timed
in the same rounds; its outputs may differ by rounding, by at most JOINT_CFG_MAX_LEVELS.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ditserve.client.config import add_model_argument
from ditserve.services.tools.bench.common import median, quartiles, result_document

PROMPT = "a red circle on a blue background"
STARTUP_TIMEOUT_S = 600.0  # a loaded 2-core machine starts model processes slowly
TARGETS = {"e2e_overhead_ratio": 1.05, "codec_decode_gbps": 4.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default: 20)")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved rounds of the three sides (default: 9)")
    parser.add_argument("--codec-repeats", type=int, default=15, help="timed codec round trips per tensor")


def _codec_tensors() -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "t5_embeds_1x512x4096_bf16": torch.randn(1, 512, 4096, generator=generator).to(torch.bfloat16),
        "latents_1x4096x64_fp32": torch.randn(1, 4096, 64, generator=generator),
        "latents_1x4096x64_bf16": torch.randn(1, 4096, 64, generator=generator).to(torch.bfloat16),
        "image_1024x1024x3_uint8": torch.randint(0, 256, (1024, 1024, 3), generator=generator, dtype=torch.uint8),
    }


def _time(function: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return median(samples)


def codec_rows(repeats: int) -> list[dict[str, Any]]:
    import torch

    from ditserve.services.common import tensor_codec
    from ditserve.v1 import tensor_pb2

    rows = []
    for name, tensor in _codec_tensors().items():
        wire = tensor_codec.encode(tensor).SerializeToString()

        def decode(wire: bytes = wire) -> torch.Tensor:
            return tensor_codec.decode(tensor_pb2.Tensor.FromString(wire))

        assert torch.equal(decode().view(torch.uint8), tensor.view(torch.uint8)), f"{name} did not round-trip"
        encode_s = _time(lambda tensor=tensor: tensor_codec.encode(tensor).SerializeToString(), repeats)
        decode_s = _time(decode, repeats)
        nbytes = tensor.numel() * tensor.element_size()
        rows.append(
            {
                "kind": "codec",
                "tensor": name,
                "bytes": nbytes,
                "encode_ms": encode_s * 1e3,
                "decode_ms": decode_s * 1e3,
                "encode_gbps": nbytes / encode_s / 1e9,
                "decode_gbps": nbytes / decode_s / 1e9,
            }
        )
    return rows


SIDES = ("services", "services_joint_cfg", "in_process", "in_process_same_policy")
# The services under `--joint-cfg always`: a request alone runs both CFG branches in one call, so its
# output may differ from the pipeline's by rounding; more than this many uint8 levels is different work.
JOINT_CFG_MAX_LEVELS = 2


def e2e_rows(model: Path, steps: int, pairs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each round runs the services (as started by default, and with --joint-cfg always), diffusers at
    its defaults and diffusers under the services' OpenMP policy on the same prompt and seed, the order
    rotating by one each round."""
    import numpy as np

    from ditserve.client.launcher import Ports, Stack
    from ditserve.client.stub import PipelineClient
    from ditserve.services.tools.bench.reference import (
        InProcessWorker,
        family_of,
        served_pixels,
        services_environment,
        user_environment,
    )

    rows: list[dict[str, Any]] = []
    # The embedding cache would spare the services the text encoding the in-process side does every round.
    no_cache = {"encoder": ["--embedding-cache-mb", "0"]}
    stacks = {
        "services": Stack(model=model, ports=Ports.free(), extra_args=no_cache),
        "services_joint_cfg": Stack(
            model=model, ports=Ports.free(), extra_args={**no_cache, "denoiser": ["--joint-cfg", "always"]}
        ),
    }
    with (
        InProcessWorker(model, steps, user_environment()) as user,
        InProcessWorker(model, steps, services_environment()) as same_policy,
    ):
        settings = user.settings
        family = family_of(model)
        with ExitStack() as running:
            for stack in stacks.values():
                running.callback(stack.stop)
                stack.start(timeout=STARTUP_TIMEOUT_S)
            clients = {name: running.enter_context(PipelineClient(stack.gateway)) for name, stack in stacks.items()}

            def served(name: str) -> Any:
                def side(seed: int) -> tuple[float, np.ndarray, Any]:
                    started = time.perf_counter()
                    output = clients[name].generate(PROMPT, seed=seed, timeout=600, **settings)
                    return time.perf_counter() - started, served_pixels(family, output), output

                return side

            sides = {
                **{name: served(name) for name in stacks},
                "in_process": lambda seed: (*user(PROMPT, seed), None),
                "in_process_same_policy": lambda seed: (*same_policy(PROMPT, seed), None),
            }
            for side in sides.values():  # warm every path once
                side(0)
            for pair in range(pairs):
                seed = pair + 1
                order = SIDES[pair % len(SIDES) :] + SIDES[: pair % len(SIDES)]
                measured = {name: sides[name](seed) for name in order}
                (served_s, pixels, output), (local_s, local, _) = measured["services"], measured["in_process"]
                policy_s, policy_pixels, _ = measured["in_process_same_policy"]
                joint_s, joint_pixels, _ = measured["services_joint_cfg"]
                rows.append(
                    {
                        "kind": "e2e",
                        "pair": pair,
                        "order": list(order),
                        "services_s": served_s,
                        "services_joint_cfg_s": joint_s,
                        "in_process_s": local_s,
                        "in_process_same_policy_s": policy_s,
                        "ratio": served_s / local_s,
                        "ratio_same_policy": served_s / policy_s,
                        "ratio_joint_cfg": joint_s / local_s,
                        "identical": bool(np.array_equal(pixels, local) and np.array_equal(pixels, policy_pixels)),
                        "joint_cfg_max_levels": int(np.abs(joint_pixels.astype(np.int16) - local).max()),
                        "stage_ms": dict(output.timing.stage_ms),
                        "queue_ms": output.timing.queue_ms,
                        "step_ms_median": median(list(output.timing.step_ms)),
                    }
                )
    return rows, {"family": family, **settings}


def stage_breakdown(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median milliseconds per stage over the rounds, and the rest of the client's wall time."""
    stages = sorted({stage for row in rows for stage in row["stage_ms"]})
    breakdown = {stage: median([row["stage_ms"].get(stage, 0.0) for row in rows]) for stage in stages}
    breakdown["unaccounted"] = median(
        [row["services_s"] * 1e3 - sum(row["stage_ms"].values()) - row["queue_ms"] for row in rows]
    )
    return breakdown


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.services.tools.bench.reference import THREADING_PREFIXES, services_environment

    codec = codec_rows(args.codec_repeats)
    e2e, settings = e2e_rows(Path(args.model), args.steps, args.pairs)
    total_bytes = sum(row["bytes"] for row in codec)
    identical = all(row["identical"] for row in e2e)
    joint_levels = max(row["joint_cfg_max_levels"] for row in e2e)
    failures = [] if identical else ["e2e_all_identical: the services and in-process outputs differ"]
    if joint_levels > JOINT_CFG_MAX_LEVELS:
        failures.append(f"joint CFG: outputs {joint_levels} levels from in-process (> {JOINT_CFG_MAX_LEVELS})")
    summary = {
        "codec_encode_gbps": total_bytes / sum(row["bytes"] / row["encode_gbps"] for row in codec),
        "codec_decode_gbps": total_bytes / sum(row["bytes"] / row["decode_gbps"] for row in codec),
        "e2e_overhead_ratio": median([row["ratio"] for row in e2e]),
        # rounds on a shared 2-core machine spread widely: the middle half says how far the median holds
        "e2e_overhead_ratio_quartiles": quartiles([row["ratio"] for row in e2e]),
        "e2e_overhead_ratio_same_policy": median([row["ratio_same_policy"] for row in e2e]),
        "e2e_services_s_median": median([row["services_s"] for row in e2e]),
        "e2e_in_process_s_median": median([row["in_process_s"] for row in e2e]),
        "e2e_in_process_same_policy_s_median": median([row["in_process_same_policy_s"] for row in e2e]),
        "e2e_all_identical": identical,
        # --joint-cfg always: a request alone's two CFG branches in one call (not bit-exact, within levels)
        "e2e_overhead_ratio_joint_cfg": median([row["ratio_joint_cfg"] for row in e2e]),
        "e2e_services_joint_cfg_s_median": median([row["services_joint_cfg_s"] for row in e2e]),
        "e2e_joint_cfg_max_levels": joint_levels,
        # where the services' time goes: each stage's median, and what no stage accounts for (hops, codecs)
        "e2e_services_stage_ms_median": stage_breakdown(e2e),
        "targets": TARGETS,
        "failures": failures,
    }
    summary["targets_met"] = {
        "e2e_overhead_ratio": summary["e2e_overhead_ratio"] <= TARGETS["e2e_overhead_ratio"],
        "codec_decode_gbps": summary["codec_decode_gbps"] >= TARGETS["codec_decode_gbps"],
    }
    config = {
        **settings,
        "pairs": args.pairs,
        "codec_repeats": args.codec_repeats,
        "prompt": PROMPT,
        "encoder_embedding_cache": "off: both sides encode the prompt every round",
        "in_process": "the family's diffusers pipeline (bench/reference.py) in a child process without "
        f"{'/'.join(p + '*' for p in THREADING_PREFIXES)} variables; same_policy: with the services' "
        "OpenMP variables",
        "services_openmp": {
            key: value for key, value in services_environment().items() if key.startswith(THREADING_PREFIXES)
        },
    }
    return result_document("transport", str(args.model), config, codec + e2e, summary)
