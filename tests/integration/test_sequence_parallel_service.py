"""`ditserve serve denoiser --sp-ulysses U --sp-ring R` over real gRPC gives the single-process latents.

Each sequence-parallel denoiser is a `ditserve serve` subprocess (rank 0) with its follower processes
(gloo on loopback, OMP_NUM_THREADS=1); the reference is an in-process single-process denoiser over the
same model folder and attention backend (torch_sdpa: ring needs its LSE). U=2 and R=2 run the shipped
tiny model (2 heads); U=2xR=2 a random 4-head transformer in a copy of it (Ulysses must divide the heads).

Tolerance: final latents (4 steps, values up to 4.1) differed from one process's by 4.8e-7 at most,
alone and batched with a DBCache request, in all three layouts (FP32, CPU, torch 2.13), with identical
cache decisions. Held to TOLERANCE_BATCHED (1e-5, tests/integration/helpers.py), which covers both the SP
and the batching reorderings; a mix-up of shards or samples would be ~1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from factories import cpu_denoiser
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from helpers import TOLERANCE_BATCHED, latents_of, request

from ditserve.client.launcher import free_port, stop_process
from ditserve.client.stub import StageClient
from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import StartupError
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.parallel.mesh import SPConfig
from ditserve.services.denoiser.service import DenoiserService
from ditserve.v1 import cache_pb2, common_pb2, denoiser_pb2, encoder_pb2

STEPS = 4
BACKEND = "torch_sdpa"
DBCACHE = '{"dbcache": {"fn": 1, "bn": 0, "residual_diff_threshold": 0.5, "max_warmup_steps": 1}}'
# Whole-step caching at 4 steps: mask 1001, so steps 1 and 2 skip the transformer call on every rank.
WHOLE_STEP = (
    '{"dbcache": {"fn": 0, "max_warmup_steps": 0, "taylorseer": {"order": 1},'
    ' "scm": {"compute_bins": [1, 1], "cache_bins": [2], "policy": "static"}}}'
)
# The shipped model has 4 heads, so U=2xR=2 gives each Ulysses rank two heads and their order is checked.
WORLDS = {"U2": (2, 1), "R2": (1, 2), "U2xR2": (2, 2)}


@pytest.fixture(scope="module")
def single(model_dir: Path) -> DenoiserService:
    """A single-process denoiser (batching off): the latents SP has to reproduce."""
    return cpu_denoiser(model_dir, batching=BatchingConfig(mode="off"), attention_backend=BACKEND)


def reference(service: DenoiserService, message: denoiser_pb2.DenoiseRequest) -> denoiser_pb2.DenoiseResult:
    return list(service.Denoise(message, _NoContext()))[-1].result


def latents(result: denoiser_pb2.DenoiseResult) -> np.ndarray:
    return tensor_codec.decode(result.latents).numpy()


class _NoContext:
    """What Denoise needs of a grpc.ServicerContext when called in-process."""

    def add_callback(self, callback: object) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None  # no client deadline


@contextmanager
def sp_denoiser(folder: Path, ulysses: int, ring: int, log: Path, *flags: str) -> Iterator[StageClient]:
    """A `ditserve serve denoiser` subprocess with sequence parallelism, ready to serve."""
    port = free_port()
    command = [sys.executable, "-m", "ditserve.client.cli", "serve", "denoiser", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", str(free_port()), "--model", str(folder)]
    command += ["--device", "cpu", "--attention-backend", BACKEND, "--sp-ulysses", str(ulysses)]
    command += ["--sp-ring", str(ring), *flags]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    client = StageClient(f"127.0.0.1:{port}")
    try:
        client.wait_ready(timeout=180)  # rank 0 and its followers import torch and diffusers: slow on a busy CPU
        yield client
    finally:
        client.close()
        stop_process(process, signal.SIGTERM, timeout=20)


def policy(text: str) -> cache_pb2.CachePolicy:
    return json_format.Parse(text, cache_pb2.CachePolicy())


@pytest.mark.parametrize("world", list(WORLDS))
def test_sp_matches_single_process(world: str, model_dir: Path, single: DenoiserService, tmp_path: Path) -> None:
    """Alone, then batched with step-cached requests: each within tolerance of one process."""
    ulysses, ring = WORLDS[world]
    plain = request(1, STEPS)
    cached = request(2, STEPS, cache=policy(DBCACHE))
    whole = request(4, STEPS, cache=policy(WHOLE_STEP))
    messages = [plain, cached, whole]
    flags = ("--batching", "continuous", "--max-batch-size", "4")
    with sp_denoiser(model_dir, ulysses, ring, tmp_path / "denoiser.log", *flags) as stage:
        info = stage.admin.Info(common_pb2.InfoRequest(), timeout=10)
        assert info.details["sequence_parallel"] == f"U{ulysses}xR{ring}"
        alone = latents_of(stage, plain)
        whole_alone = latents_of(stage, whole)  # no rank runs the model on a skipped step
        with ThreadPoolExecutor(len(messages)) as pool:
            together = list(pool.map(lambda message: list(stage.denoiser.Denoise(message, timeout=60)), messages))
        with pytest.raises(grpc.RpcError) as uneven:
            latents_of(stage, request(3, STEPS, height=80, width=80))  # 25 image tokens
    assert np.abs(alone - latents(reference(single, plain))).max() <= TOLERANCE_BATCHED
    assert np.abs(whole_alone - latents(reference(single, whole))).max() <= TOLERANCE_BATCHED
    for message, events in zip(messages, together, strict=True):
        result, expected = events[-1].result, reference(single, message)
        assert np.abs(latents(result) - latents(expected)).max() <= TOLERANCE_BATCHED
        assert dict(result.timing.computed_steps) == dict(expected.timing.computed_steps)
    assert "0" in together[1][-1].result.timing.computed_steps["cond"]  # the cache really skipped steps
    assert together[2][-1].result.timing.computed_steps["cond"] == "1001"
    assert uneven.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "height/width" in uneven.value.details()


def health(stage: StageClient) -> str:
    answer = stage.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def wan_request(seed: int, policy_text: str | None = None) -> denoiser_pb2.DenoiseRequest:
    """A Wan request on random UMT5-shaped embeddings (the tiny folder's 32 wide), CFG with a negative."""
    generator = torch.Generator().manual_seed(seed)
    prompt, negative = (torch.randn(1, 16, 32, generator=generator) for _ in range(2))
    message = denoiser_pb2.DenoiseRequest(
        request_id=f"wan-{seed}",
        prompt=encoder_pb2.PromptEmbedding(prompt_embeds=tensor_codec.encode(prompt)),
        negative_prompt=encoder_pb2.PromptEmbedding(prompt_embeds=tensor_codec.encode(negative)),
        num_inference_steps=STEPS,
        seed=seed,
    )
    if policy_text is not None:
        message.cache.CopyFrom(policy(policy_text))
    return message


def test_wan_sp_matches_single_process_alone_and_batched(wan_model: Path, tmp_path: Path) -> None:
    """U=2xR=2 over the video tokens (text replicated for cross-attention), plain and step-cached; CFG
    requests, so batched they share one call for both branches, which every rank replays slot by slot."""
    single = cpu_denoiser(wan_model, batching=BatchingConfig(mode="off"), attention_backend=BACKEND)
    messages = [wan_request(1), wan_request(2, DBCACHE)]
    flags = ("--batching", "continuous", "--max-batch-size", "4")
    with sp_denoiser(wan_model, 2, 2, tmp_path / "denoiser.log", *flags) as stage:
        alone = latents_of(stage, messages[0])
        with ThreadPoolExecutor(len(messages)) as pool:
            together = list(pool.map(lambda message: list(stage.denoiser.Denoise(message, timeout=60)), messages))
    assert np.abs(alone - latents(reference(single, messages[0]))).max() <= TOLERANCE_BATCHED
    for message, events in zip(messages, together, strict=True):
        result, expected = events[-1].result, reference(single, message)
        assert np.abs(latents(result) - latents(expected)).max() <= TOLERANCE_BATCHED
        assert dict(result.timing.computed_steps) == dict(expected.timing.computed_steps)
    single.close()


def test_dead_follower_makes_requests_unavailable(model_dir: Path, tmp_path: Path) -> None:
    """A follower killed mid-request: that request and the next end UNAVAILABLE within seconds, and the
    denoiser's health says NOT_SERVING (with the reason in its log) so a gateway stops sending it work."""
    log = tmp_path / "denoiser.log"
    with sp_denoiser(model_dir, 2, 1, log) as stage:
        assert health(stage) == "SERVING"
        follower = int(re.search(r"follower pids \[(\d+)\]", log.read_text()).group(1))
        stream = stage.denoiser.Denoise(request(4, steps=200, height=256, width=256), timeout=60)
        next(stream)  # the request is running
        os.kill(follower, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as running:
            list(stream)
        with pytest.raises(grpc.RpcError) as after:
            latents_of(stage, request(5, STEPS))
        elapsed = time.monotonic() - started
        while health(stage) != "NOT_SERVING" and time.monotonic() - started < 10:
            time.sleep(0.2)
        assert health(stage) == "NOT_SERVING"
    assert "sequence-parallel group broken" in log.read_text()
    assert running.value.code() == grpc.StatusCode.UNAVAILABLE, running.value.details()
    assert after.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 10


def test_a_follower_dying_while_idle_flips_health_without_a_request(model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "denoiser.log"
    with sp_denoiser(model_dir, 2, 1, log) as stage:
        follower = int(re.search(r"follower pids \[(\d+)\]", log.read_text()).group(1))
        os.kill(follower, signal.SIGKILL)
        started = time.monotonic()
        while health(stage) != "NOT_SERVING" and time.monotonic() - started < 10:
            time.sleep(0.2)
        assert health(stage) == "NOT_SERVING"
        assert time.monotonic() - started < 10


def test_layout_the_model_cannot_take_fails_startup(model_dir: Path) -> None:
    """Checked before any process starts: Ulysses 3 cannot split the shipped model's 4 heads."""
    with pytest.raises(StartupError, match="ulysses degree 3 must divide the attention heads"):
        cpu_denoiser(model_dir, attention_backend=BACKEND, sequence_parallel=SPConfig(ulysses=3))
