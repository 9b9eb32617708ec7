"""`ditserve bench transport`: what the wire costs.

(a) Tensor codec throughput at FLUX.1-dev sizes, including protobuf
serialization (what gRPC does with the message): encode = tensor -> Tensor ->
bytes, decode = bytes -> Tensor -> tensor view.
(b) End-to-end latency of the four-service path against FluxPipeline in this
process, same model, prompt, seed, size and steps, runs interleaved.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ditserve.client.config import default_model_dir
from ditserve.services.tools.bench.common import median, result_document

PROMPT = "a red circle on a blue background"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(default_model_dir()), help="model folder (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default: 20)")
    parser.add_argument("--pairs", type=int, default=7, help="interleaved service/in-process pairs (default: 7)")
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


def e2e_rows(model: Path, steps: int, pairs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    from ditserve.client.launcher import Ports, Stack
    from ditserve.client.stub import PipelineClient
    from ditserve.services.common.model import ModelFolder

    defaults = ModelFolder(model).defaults
    settings = {"height": defaults.height, "width": defaults.width, "steps": steps}
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def in_process(seed: int) -> np.ndarray:
        image = pipe(
            PROMPT,
            height=defaults.height,
            width=defaults.width,
            num_inference_steps=steps,
            guidance_scale=defaults.guidance_scale,
            max_sequence_length=defaults.max_sequence_length,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return np.asarray(image)

    rows: list[dict[str, Any]] = []
    stack = Stack(model=model, ports=Ports.free())
    stack.start()
    try:
        with PipelineClient(stack.gateway) as client:
            client.generate(PROMPT, seed=0, **settings)  # warm both paths once
            in_process(0)
            for pair in range(pairs):
                seed = pair + 1
                started = time.perf_counter()
                output = client.generate(PROMPT, seed=seed, **settings)
                served_s = time.perf_counter() - started
                started = time.perf_counter()
                reference = in_process(seed)
                local_s = time.perf_counter() - started
                rows.append(
                    {
                        "kind": "e2e",
                        "pair": pair,
                        "services_s": served_s,
                        "in_process_s": local_s,
                        "ratio": served_s / local_s,
                        "identical": bool(np.array_equal(np.asarray(output.images[0]), reference)),
                        "stage_ms": dict(output.timing.stage_ms),
                        "queue_ms": output.timing.queue_ms,
                        "step_ms_median": median(list(output.timing.step_ms)),
                    }
                )
    finally:
        stack.stop()
    return rows, settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.client.cli import prefer_passive_openmp

    prefer_passive_openmp()  # the in-process side runs under the same OpenMP policy as the services
    codec = codec_rows(args.codec_repeats)
    e2e, settings = e2e_rows(Path(args.model), args.steps, args.pairs)
    total_bytes = sum(row["bytes"] for row in codec)
    summary = {
        "codec_encode_gbps": total_bytes / sum(row["bytes"] / row["encode_gbps"] for row in codec),
        "codec_decode_gbps": total_bytes / sum(row["bytes"] / row["decode_gbps"] for row in codec),
        "e2e_overhead_ratio": median([row["ratio"] for row in e2e]),
        "e2e_services_s_median": median([row["services_s"] for row in e2e]),
        "e2e_in_process_s_median": median([row["in_process_s"] for row in e2e]),
        "e2e_all_identical": all(row["identical"] for row in e2e),
    }
    config = {
        **settings,
        "pairs": args.pairs,
        "codec_repeats": args.codec_repeats,
        "prompt": PROMPT,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    return result_document("transport", str(args.model), config, codec + e2e, summary)
