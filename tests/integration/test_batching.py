"""Batching in a real denoiser over real gRPC: each image as it would be alone, failures and
cancellations isolated, back-pressure when the queue is full."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from factories import cpu_denoiser
from helpers import TOLERANCE_BATCHED, embedding, latents_of, request, sample, scrape

from ditserve.client.stub import StageClient
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.v1 import denoiser_pb2

pytestmark = pytest.mark.integration

TOLERANCE = TOLERANCE_BATCHED


def _concurrently(stage: StageClient, requests: list[denoiser_pb2.DenoiseRequest]) -> list[np.ndarray]:
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda message: latents_of(stage, message), requests))


def cfg_request(seed: int) -> denoiser_pb2.DenoiseRequest:
    """With true CFG: a batch then runs both branches in one transformer call (runner.py)."""
    return request(seed, true_cfg_scale=3.0, negative_prompt=embedding(100 + seed))


@pytest.mark.parametrize("mode", ["dynamic", "continuous"])
@pytest.mark.parametrize("make", [request, cfg_request], ids=["no-cfg", "cfg"])
def test_batched_images_match_their_solo_images(denoisers: dict, mode: str, make: Callable) -> None:
    server, stage = denoisers[mode]
    _, solo_stage = denoisers["off"]
    requests = [make(seed) for seed in range(4)]
    solo = [latents_of(solo_stage, message) for message in requests]
    before = scrape(server.metrics_port)
    together = _concurrently(stage, requests)
    after = scrape(server.metrics_port)
    batched = sample(after, "ditserve_batch_size_sum") - sample(before, "ditserve_batch_size_sum")
    dispatches = sample(after, "ditserve_batch_size_count") - sample(before, "ditserve_batch_size_count")
    assert dispatches < 4 and batched >= 4, "the four requests never shared a batch"
    for alone, batch in zip(solo, together, strict=True):
        assert np.abs(alone - batch).max() <= TOLERANCE
    assert not np.allclose(together[0], together[1])


def test_continuous_admits_a_newcomer_mid_run(denoisers: dict) -> None:
    server, stage = denoisers["continuous"]
    _, solo_stage = denoisers["off"]
    long, late = request(1, steps=30), request(2, steps=4)
    expected = latents_of(solo_stage, late)
    stream = stage.denoiser.Denoise(long, timeout=120)
    next(stream)  # the long request is running
    late_result = latents_of(stage, late)
    long_events = list(stream)
    assert long_events[-1].HasField("result")
    assert np.abs(late_result - expected).max() <= TOLERANCE
    joins = sample(scrape(server.metrics_port), "ditserve_batch_size_count", stop_reason="drain")
    assert joins >= 2


def test_a_failing_request_fails_alone(denoisers: dict) -> None:
    _, stage = denoisers["continuous"]
    _, solo_stage = denoisers["off"]
    good = [request(seed) for seed in (5, 6)]
    expected = [latents_of(solo_stage, message) for message in good]
    # Finite on the wire (so validation admits it) but overflows inside the transformer.
    poison = denoiser_pb2.DenoiseRequest(
        request_id="poison", prompt=embedding(7, scale=1e30), num_inference_steps=6, seed=7, true_cfg_scale=1.0
    )
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(latents_of, stage, message) for message in [good[0], poison, good[1]]]
        with pytest.raises(grpc.RpcError) as caught:
            futures[1].result()
        results = [futures[0].result(), futures[2].result()]
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert "NaN or Inf" in caught.value.details()
    for got, want in zip(results, expected, strict=True):
        assert np.abs(got - want).max() <= TOLERANCE


def test_cancel_mid_batch_frees_the_slot(denoisers: dict) -> None:
    server, stage = denoisers["continuous"]
    _, solo_stage = denoisers["off"]
    keep = request(8, steps=12)
    expected = latents_of(solo_stage, keep)
    doomed = stage.denoiser.Denoise(request(9, steps=200), timeout=120)
    next(doomed)
    result: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: result.append(latents_of(stage, keep)))
    worker.start()
    doomed.cancel()
    worker.join(timeout=120)
    assert np.abs(result[0] - expected).max() <= TOLERANCE
    metrics = scrape(server.metrics_port)
    assert sample(metrics, "ditserve_running_requests") == 0
    assert sample(metrics, "ditserve_requests_total", method="Denoise", code="CANCELLED") >= 1


def test_full_queue_answers_resource_exhausted(denoisers: dict) -> None:
    _, stage = denoisers["off"]  # one at a time, at most 8 waiting
    requests = [request(100 + i, steps=40) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(lambda r: _outcome(stage, r), requests))
    codes = [code for code, _ in outcomes]
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    refused = [seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert max(refused) < 1.0, "the excess must be refused at once, not after waiting"


def _outcome(stage: StageClient, message: denoiser_pb2.DenoiseRequest) -> tuple[str, float]:
    started = time.monotonic()
    try:
        latents_of(stage, message)
        return "OK", time.monotonic() - started
    except grpc.RpcError as error:
        assert "queue is full" in error.details() or error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED
        return error.code().name, time.monotonic() - started


def test_every_step_streams_when_the_interval_is_zero(model_dir: Path, tmp_path: Path) -> None:
    service = cpu_denoiser(model_dir, profiles=tmp_path, progress_interval_ms=0)
    server = start_server(service, ServerOptions(port=0, metrics_port=None))
    client = StageClient(f"127.0.0.1:{server.port}")
    try:
        events = list(client.denoiser.Denoise(request(1, steps=5), timeout=60))
    finally:
        client.close()
        server.stop(grace=1)
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3, 4, 5]


def test_a_result_says_whether_it_shared_a_call(denoisers: dict) -> None:
    """DenoiseResult.batched: what lets the VAE join its decode with others (batched latents already moved)."""

    def result(stage: StageClient, message: denoiser_pb2.DenoiseRequest) -> denoiser_pb2.DenoiseResult:
        return list(stage.denoiser.Denoise(message, timeout=120))[-1].result

    _, solo_stage = denoisers["off"]
    _, stage = denoisers["continuous"]
    assert not result(solo_stage, request(40)).batched
    assert not result(stage, request(41)).batched  # alone in a batching denoiser
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda seed: result(stage, request(seed, steps=12)), range(42, 46)))
    assert sum(r.batched for r in together) >= 2  # at least the first two overlapped
