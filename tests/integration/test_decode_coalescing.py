"""`ditserve serve vae --max-decode-batch`: concurrent decodes of one shape become one VAE call, each
request gets its own image back (within the one uint8 level a batched decode may move a value), and a bad
request beside them is refused alone. The default (each request alone) is test_pipeline.py's."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import beside, latents_of, request, sample, scrape, wait_for

from ditserve.client.launcher import free_port
from ditserve.client.stub import PipelineClient, StageClient
from ditserve.client.tensors import from_numpy, to_numpy
from ditserve.v1 import common_pb2, vae_pb2

pytestmark = pytest.mark.integration

BATCH = 4


def _decode(address: str, latents: np.ndarray, height: int = 64) -> np.ndarray:
    stage = StageClient(address)
    try:
        message = vae_pb2.DecodeRequest(latents=from_numpy(latents), height=height, width=64, format=common_pb2.RAW)
        return to_numpy(stage.vae.Decode(message, timeout=120).images[0].pixels)
    finally:
        stage.close()


def test_concurrent_decodes_join_one_call_and_each_gets_its_own_image(stack: object, tmp_path: Path) -> None:
    denoiser = StageClient(stack.ports.address("denoiser"))
    latents = [latents_of(denoiser, request(seed, steps=2)) for seed in range(BATCH)]
    denoiser.close()
    alone = [_decode(stack.ports.address("vae"), each) for each in latents]
    flags = ["--max-decode-batch", str(BATCH), "--decode-wait-ms", "20000"]
    with beside(stack, ("vae",), tmp_path, vae=flags) as side:
        side.wait_ready("vae", 180)
        address, port = side.ports.address("vae"), side.ports.metrics["vae"]
        before = scrape(port)
        with concurrent.futures.ThreadPoolExecutor(BATCH + 1) as pool:
            joined = [pool.submit(_decode, address, each) for each in latents]
            # a bad request among them (latents that are not 128x64's) is refused at once, alone
            refused = pool.submit(_decode, address, latents[0], 128)
            with pytest.raises(grpc.RpcError) as caught:
                refused.result(timeout=60)
            images = [future.result(timeout=120) for future in joined]
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "latents.shape" in caught.value.details()
        count, total = "ditserve_decode_batch_size_count", "ditserve_decode_batch_size_sum"
        after = wait_for(port, count, sample(before, count) + 1)
        assert sample(after, count) - sample(before, count) == 1  # one call
        assert sample(after, total) - sample(before, total) == BATCH  # of all four
    for image, solo in zip(images, alone, strict=True):
        assert image.shape == solo.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - solo.astype(int)).max() <= 1
    assert len({image.tobytes() for image in images}) == BATCH  # each request its own image


def test_a_bad_decode_batch_setting_stops_start_up_before_the_model_loads(model_dir: Path) -> None:
    command = [sys.executable, "-m", "ditserve.client.cli", "serve", "vae", "--model", str(model_dir)]
    command += ["--max-decode-batch", "0", "--port", str(free_port()), "--metrics-port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--max-decode-batch/--batched-decode-batch/--decode-wait-ms" in result.stderr
    assert "at least 1" in result.stderr


def test_decodes_of_a_batched_denoise_join_one_call_and_a_solo_request_stays_bit_exact(
    stack: object, tmp_path: Path
) -> None:
    """A continuous denoiser batches four requests that arrive together; their latents say so, and the VAE
    (its default --batched-decode-batch, no --max-decode-batch) decodes them in one call. The shared stack's
    denoiser (batching off) gives the solo images, which its VAE decodes alone."""
    prompts = [f"a red {shape} on a blue background" for shape in ("circle", "square", "ring", "cross")]
    shared = PipelineClient(stack.gateway)
    alone = [_generated(shared, prompt) for prompt in prompts]
    shared.close()
    flags = {"denoiser": ["--batching", "continuous"], "vae": ["--batched-decode-batch", str(BATCH)]}
    flags["vae"] += ["--decode-wait-ms", "20000"]  # a group of four is full at once: never waited out
    with beside(stack, ("denoiser", "vae", "gateway"), tmp_path, **flags) as side:
        for role in ("denoiser", "vae", "gateway"):
            side.wait_ready(role, 180)
        port = side.ports.metrics["vae"]
        batched = PipelineClient(side.gateway)
        before = scrape(port)
        with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
            images = list(pool.map(lambda prompt: _generated(batched, prompt), prompts))
        solo_again = _generated(batched, prompts[0])  # alone on the side stack too: decoded alone
        batched.close()
        count, total = "ditserve_decode_batch_size_count", "ditserve_decode_batch_size_sum"
        after = wait_for(port, count, sample(before, count) + 2)
    assert sample(after, count) - sample(before, count) == 2  # the four in one call, then the fifth alone
    assert sample(after, total) - sample(before, total) == BATCH + 1
    assert np.array_equal(solo_again, alone[0])  # alone end to end: bit-exact, as on the shared stack
    for image, solo in zip(images, alone, strict=True):
        assert np.abs(image.astype(int) - solo.astype(int)).max() <= 2  # low bits only: same images
    assert len({image.tobytes() for image in images}) == BATCH


def _generated(client: PipelineClient, prompt: str) -> np.ndarray:
    return np.asarray(client.generate(prompt, seed=5, steps=4, output_format="raw").images[0])
