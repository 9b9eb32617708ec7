"""End to end through four real processes on loopback, talking real gRPC."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import sample, scrape, wait_for
from PIL import Image

from ditserve.client.config import DEFAULT_MODEL_NAME
from ditserve.client.stub import PipelineClient, StageClient
from ditserve.client.tensors import from_numpy
from ditserve.services.common.model import ModelFolder
from ditserve.v1 import common_pb2, denoiser_pb2, encoder_pb2, tensor_pb2, vae_pb2

PROMPT = "a red circle on a blue background"
STEPS = 4

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(stack: object) -> PipelineClient:
    with PipelineClient(stack.gateway) as c:
        yield c


@pytest.fixture(scope="module")
def reference_pipeline(model_dir: Path) -> object:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(model_dir)


def _served(client: PipelineClient, **settings: object) -> np.ndarray:
    output = client.generate(PROMPT, steps=STEPS, **settings)
    return np.stack([np.asarray(image) for image in output.images])


def _in_process(pipe: object, seed: int, **settings: object) -> np.ndarray:
    """FluxPipeline at the folder's defaults (ditserve.json), as the services resolve them."""
    defaults = ModelFolder(pipe.config._name_or_path).defaults
    settings = {"true_cfg_scale": defaults.true_cfg_scale, "negative_prompt": "", **settings}
    images = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=defaults.height,
        width=defaults.width,
        max_sequence_length=defaults.max_sequence_length,
        generator=torch.Generator().manual_seed(seed),
        **settings,
    ).images
    return np.stack([np.asarray(image) for image in images])


@pytest.mark.parametrize(
    ("served", "in_process"),
    [
        ({}, {}),
        ({"true_cfg_scale": 1.0}, {"true_cfg_scale": 1.0}),
        ({"true_cfg_scale": 2.0, "negative_prompt": "a ring"}, {"true_cfg_scale": 2.0, "negative_prompt": "a ring"}),
        ({"num_images": 2}, {"num_images_per_prompt": 2}),
    ],
    ids=["model-defaults", "no-cfg", "true-cfg", "two-images"],
)
def test_served_image_is_bit_exact_with_flux_pipeline(
    client: PipelineClient, reference_pipeline: object, served: dict, in_process: dict
) -> None:
    """Same components, prompt, seed, size, steps: the same ops in the same order on the same device,
    so the services match FluxPipeline bit for bit (not merely within 1/255)."""
    ours = _served(client, seed=7, **served)
    theirs = _in_process(reference_pipeline, 7, **in_process)
    assert ours.shape == theirs.shape
    assert ours.std() > 1.0, "a constant image would match trivially"
    assert np.array_equal(ours, theirs)


def test_concurrent_requests_match_their_solo_images(client: PipelineClient) -> None:
    solo = {seed: _served(client, seed=seed) for seed in (11, 12)}
    assert not np.array_equal(solo[11], solo[12])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {seed: pool.submit(_served, client, seed=seed) for seed in (11, 12)}
        together = {seed: future.result() for seed, future in futures.items()}
    for seed in solo:
        assert np.array_equal(solo[seed], together[seed])


def test_output_formats_and_timing(client: PipelineClient) -> None:
    output = client.generate(PROMPT, steps=STEPS, seed=3, output_format="raw")
    png = client.generate(PROMPT, steps=STEPS, seed=3)
    assert np.array_equal(np.asarray(output.images[0]), np.asarray(png.images[0]))
    assert output.encoded[0].format == common_pb2.RAW and output.images[0].size == (64, 64)
    assert client.generate(PROMPT, steps=STEPS, seed=3, output_format="jpeg").images[0].format == "JPEG"
    assert output.seed == 3
    assert len(output.timing.step_ms) == STEPS
    assert {"encode", "denoise", "decode", "gateway"} <= set(output.timing.stage_ms)
    assert output.timing.total_ms >= sum(output.timing.step_ms)


def test_progress_is_monotone_and_ends_at_the_last_step(client: PipelineClient) -> None:
    """Fast steps are coalesced (--progress-interval-ms), but progress never goes back and always
    reports the final step."""
    seen: list[tuple[str, int]] = []
    client.generate(PROMPT, steps=STEPS, seed=1, on_progress=lambda p: seen.append((p.stage, p.step)))
    denoise = [step for stage, step in seen if stage == "denoise"]
    assert seen[0] == ("encode", 0) and seen[-1] == ("decode", 0)
    assert denoise == sorted(set(denoise)) and denoise[-1] == STEPS


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"width": 100}, "width"),
        ({"height": 8}, "height"),
        ({"height": 4096}, "height"),
        ({"steps": 1000}, "num_inference_steps"),
        ({"num_images": 99}, "num_images"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"true_cfg_scale": -1.0}, "true_cfg_scale"),
    ],
)
def test_bad_generate_requests_name_the_field(client: PipelineClient, settings: dict, field: str) -> None:
    prompt = settings.pop("prompt", PROMPT)
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(prompt, steps=settings.pop("steps", STEPS), **settings)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert _served(client, seed=1).std() > 0  # still serving


def _tensor(datatype: str, shape: list[int], nbytes: int) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(datatype=datatype, shape=shape, raw_data=b"\0" * nbytes)


MALFORMED = [
    (_tensor("FP32", [1, 64, 32], 10), "raw_data"),
    (_tensor("FP4", [1, 64, 32], 64 * 32), "datatype"),
    (_tensor("FP32", [1, -64, 32], 0), "shape"),
    (_tensor("FP32", [1, 2**40, 2**20], 0), "shape"),
    (_tensor("INT64", [1, 64, 32], 64 * 32 * 8), "datatype"),
]


@pytest.mark.parametrize(("tensor", "part"), MALFORMED)
def test_malformed_tensors_are_rejected_by_the_denoiser(stack: object, tensor: tensor_pb2.Tensor, part: str) -> None:
    stage = StageClient(stack.ports.address("denoiser"))
    embedding = encoder_pb2.PromptEmbedding(prompt_embeds=tensor, pooled_prompt_embeds=_tensor("FP32", [1, 32], 128))
    request = denoiser_pb2.DenoiseRequest(prompt=embedding, num_inference_steps=1)
    with pytest.raises(grpc.RpcError) as caught:
        list(stage.denoiser.Denoise(request, timeout=30))
    stage.close()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt.prompt_embeds.{part}" in caught.value.details()


@pytest.mark.parametrize(("tensor", "part"), MALFORMED)
def test_malformed_tensors_are_rejected_by_the_vae(stack: object, tensor: tensor_pb2.Tensor, part: str) -> None:
    stage = StageClient(stack.ports.address("vae"))
    with pytest.raises(grpc.RpcError) as caught:
        stage.vae.Decode(vae_pb2.DecodeRequest(latents=tensor, height=64, width=64), timeout=30)
    stage.close()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"latents.{part}" in caught.value.details()


def test_encoder_rejects_empty_prompt_lists(stack: object) -> None:
    stage = StageClient(stack.ports.address("encoder"))
    with pytest.raises(grpc.RpcError) as caught:
        stage.encoder.Encode(encoder_pb2.EncodeRequest(), timeout=30)
    stage.close()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts" in caught.value.details()


def test_deadline_stops_the_denoiser(stack: object, client: PipelineClient) -> None:
    port = stack.ports.metrics["denoiser"]
    before = sample(scrape(port), "ditserve_denoise_step_duration_seconds_count")
    with pytest.raises(grpc.RpcError) as caught:
        # 1024x1024 makes each step slow enough that 200 of them cannot beat the deadline.
        client.generate(PROMPT, steps=200, height=1024, width=1024, seed=5, timeout=1.5)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The request leaves at the engine's next step boundary (a 1024^2 step can take seconds on a busy CPU).
    deadline = time.monotonic() + 60
    while sample(scrape(port), "ditserve_running_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped_at = sample(scrape(port), "ditserve_denoise_step_duration_seconds_count")
    time.sleep(1.0)
    assert sample(scrape(port), "ditserve_denoise_step_duration_seconds_count") == stopped_at
    assert stopped_at - before < 200, "the denoiser ran the abandoned request to the end"
    codes = scrape(port)
    assert (
        sample(codes, "ditserve_requests_total", method="Denoise", code="DEADLINE_EXCEEDED")
        + sample(codes, "ditserve_requests_total", method="Denoise", code="CANCELLED")
        >= 1
    )


def test_every_service_counts_requests(stack: object, client: PipelineClient) -> None:
    methods = {"gateway": "Generate", "encoder": "Encode", "denoiser": "Denoise", "vae": "Decode"}
    before = {role: scrape(stack.ports.metrics[role]) for role in methods}
    client.generate(PROMPT, steps=STEPS, seed=2)
    for role, method in methods.items():
        labels = {"service": role, "method": method, "code": "OK"}
        expected = sample(before[role], "ditserve_requests_total", **labels) + 1
        after = wait_for(stack.ports.metrics[role], "ditserve_requests_total", expected, **labels)
        moved = sample(after, "ditserve_requests_total", **labels) - expected + 1
        assert moved == 1, f"{role} counted {moved} {method} calls"
        assert sample(after, "ditserve_request_duration_seconds_count", service=role, method=method) >= 1
        assert sample(after, "ditserve_model_info", service=role) == 1
        assert sample(after, "ditserve_tensor_bytes_total", service=role) > 0 or role == "gateway"
    denoiser = scrape(stack.ports.metrics["denoiser"])
    assert sample(denoiser, "ditserve_device_memory_bytes", kind="host_rss") > 0
    assert sample(denoiser, "ditserve_queue_duration_seconds_count") >= 1


def test_the_vae_reports_how_many_images_each_decode_call_held(stack: object, client: PipelineClient) -> None:
    port = stack.ports.metrics["vae"]
    before = scrape(port)
    client.generate(PROMPT, steps=STEPS, seed=3, num_images=2)
    calls = sample(before, "ditserve_decode_batch_size_count") + 1
    after = wait_for(port, "ditserve_decode_batch_size_count", calls)
    assert sample(after, "ditserve_decode_batch_size_count") == calls
    assert sample(after, "ditserve_decode_batch_size_sum") - sample(before, "ditserve_decode_batch_size_sum") == 2


def test_info_and_health_on_every_service(stack: object) -> None:
    for role in ("gateway", "encoder", "denoiser", "vae"):
        stage = StageClient(stack.ports.address(role))
        info = stage.admin.Info(common_pb2.InfoRequest(), timeout=10)
        stage.wait_ready(5)
        stage.close()
        assert info.service == role and info.version
        if role != "gateway":
            assert info.model.endswith(DEFAULT_MODEL_NAME) and info.dtype == "fp32" and info.device == "cpu"
        if role == "denoiser":
            assert info.attention_backend == "torch_sdpa"  # auto's choice on CPU
            # what preset "calibrated" can ask of the shipped model: its ditserve.json's 28-step masks
            assert info.details["step_masks"] == "28 steps: 6-27 computed, TaylorSeer order 1"
            metrics = scrape(stack.ports.metrics[role])
            assert sample(metrics, "ditserve_model_info", service=role, attention_backend="torch_sdpa") == 1


def test_generate_cli_writes_the_image(stack: object, client: PipelineClient, tmp_path: Path) -> None:
    target = tmp_path / "cli.png"
    command = [sys.executable, "-m", "ditserve.client.cli", "generate", PROMPT, "--target", stack.gateway]
    result = subprocess.run(
        [*command, "-o", str(target), "--steps", str(STEPS), "--seed", "9"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "seed 9" in result.stdout
    assert np.array_equal(np.asarray(Image.open(target)), _served(client, seed=9)[0])
    bad = subprocess.run([*command, "-o", str(target), "--width", "100"], capture_output=True, text=True)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: width" in bad.stderr


@pytest.mark.parametrize(("value", "words"), [(float("nan"), "NaN or Inf"), (1e7, "beyond")])
def test_extreme_values_are_refused_before_they_reach_the_model(stack: object, value: float, words: str) -> None:
    stage = StageClient(stack.ports.address("denoiser"))
    embeds = np.zeros((1, 8, 32), dtype=np.float32)
    embeds[0, 3, 5] = value
    embedding = encoder_pb2.PromptEmbedding(
        prompt_embeds=from_numpy(embeds), pooled_prompt_embeds=from_numpy(np.zeros((1, 32), np.float32))
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stage.denoiser.Denoise(denoiser_pb2.DenoiseRequest(prompt=embedding, num_inference_steps=1), timeout=30))
    stage.close()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("prompt.prompt_embeds:") and words in caught.value.details()
