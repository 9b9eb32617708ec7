"""Wan2.1 text-to-video through the four real services (tiny random-weight folder, CPU, FP32).

The served clip equals WanPipeline's in-process output for the same components, prompt, negative prompt,
seed, frames, size and steps; caching that never skips is exact; a batch mixing policies gives each
request its solo latents; the CLI writes a playable MP4; bad input is refused naming the field.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from helpers import TOLERANCE_BATCHED, http_call, wait_http

from ditserve.client.launcher import Ports, Stack
from ditserve.client.stub import PipelineClient, StageClient
from ditserve.services.common import tensor_codec
from ditserve.v1 import cache_pb2, common_pb2, denoiser_pb2, encoder_pb2, vae_pb2

pytestmark = pytest.mark.integration
PROMPT = "a red circle moving right"
FRAMES, SIZE, STEPS, SEED = 9, 64, 4, 3


@pytest.fixture(scope="module")
def wan_stack(wan_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    batching = ["--batching", "continuous", "--max-batch-size", "4"]
    running = Stack(
        model=wan_model,
        ports=Ports.free(),
        log_dir=tmp_path_factory.mktemp("wan-logs"),
        extra_args={"denoiser": batching},
    )
    running.start(timeout=180)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(wan_stack: Stack) -> Iterator[PipelineClient]:
    with PipelineClient(wan_stack.ports.address("gateway")) as client:
        yield client


def stage(stack: Stack, role: str) -> StageClient:
    return StageClient(stack.ports.address(role))


def test_served_clip_is_bit_exact_with_wan_pipeline(client: PipelineClient, wan_model: Path) -> None:
    from diffusers import WanPipeline

    served = client.generate(
        PROMPT, seed=SEED, steps=STEPS, num_frames=FRAMES, width=SIZE, height=SIZE, video_format="raw", timeout=120
    )
    pipe = WanPipeline.from_pretrained(wan_model, local_files_only=True)
    reference = pipe(
        PROMPT,
        negative_prompt="",
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=5.0,  # the tiny folder's default, which the served request left unset
        max_sequence_length=32,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).frames[0]
    frames = np.stack([np.asarray(frame) for frame in served.videos[0]])
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(frames, (reference * 255).round().astype(np.uint8))
    assert served.timing.step_ms and len(served.timing.step_ms) == STEPS


def embeddings(stack: Stack, prompts: list[str]) -> list[encoder_pb2.PromptEmbedding]:
    response = stage(stack, "encoder").encoder.Encode(encoder_pb2.EncodeRequest(prompts=prompts, allow_empty=True))
    return list(response.embeddings)


def denoise(stack: Stack, seed: int, policy: str | None = None, **fields: object) -> np.ndarray:
    prompt, negative = embeddings(stack, [PROMPT, ""])
    message = denoiser_pb2.DenoiseRequest(
        request_id=f"wan-{seed}-{policy}",
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        num_inference_steps=8,
        **fields,
    )
    if policy is not None:
        message.cache.CopyFrom(json_format.Parse(policy, cache_pb2.CachePolicy()))
    events = list(stage(stack, "denoiser").denoiser.Denoise(message, timeout=120))
    return tensor_codec.decode(events[-1].result.latents).numpy().copy()


@pytest.mark.parametrize("policy", ['{"teacache": {"threshold": 0}}', '{"dbcache": {"residual_diff_threshold": 0}}'])
def test_policies_that_never_cache_are_bit_exact_on_wan(wan_stack: Stack, policy: str) -> None:
    assert np.array_equal(denoise(wan_stack, 5, policy), denoise(wan_stack, 5))


def test_a_batch_mixing_policies_gives_each_request_its_solo_latents(wan_stack: Stack) -> None:
    policies = [None, '{"teacache": {"threshold": 0.2}}', '{"dbcache": {"residual_diff_threshold": 0.2}}']
    solo = [denoise(wan_stack, 10 + i, policy) for i, policy in enumerate(policies)]
    with concurrent.futures.ThreadPoolExecutor(len(policies)) as pool:
        together = list(pool.map(lambda args: denoise(wan_stack, 10 + args[0], args[1]), enumerate(policies)))
    for alone, batched in zip(solo, together, strict=True):
        assert np.abs(alone - batched).max() <= TOLERANCE_BATCHED


def test_generate_cli_writes_a_playable_mp4(wan_stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    command = [sys.executable, "-m", "ditserve.client.cli", "generate", PROMPT, "--frames", str(FRAMES)]
    command += ["--fps", "8", "--seed", "1", "--target", wan_stack.ports.address("gateway"), "-o", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", SIZE, SIZE)
        assert stream.average_rate == 8
        assert frames[0].format.name == "yuv420p"
    assert len(frames) == FRAMES


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"num_frames": 8}, "num_frames"),
        ({"num_frames": 125, "height": 1024, "width": 1024}, "num_frames"),
        ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ],
)
def test_bad_video_requests_name_the_field(client: PipelineClient, fields: dict, field: str) -> None:
    error = rpc_error(lambda: client.generate(PROMPT, steps=2, timeout=60, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_video_latents_of_the_wrong_shape_are_refused(wan_stack: Stack) -> None:
    latents = tensor_codec.encode(torch.zeros(1, 4, 2, 8, 8))  # 2 latent frames: 5 frames, not 9
    message = vae_pb2.DecodeRequest(latents=latents, height=SIZE, width=SIZE, num_frames=FRAMES)
    error = rpc_error(lambda: stage(wan_stack, "vae").vae.Decode(message, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "latents.shape" in error.details()
    # nothing else is disturbed: the stack still serves
    assert denoise(wan_stack, 1).shape == (1, 4, 3, 8, 8)


def test_an_image_family_refuses_frames(stack: object) -> None:
    """The shipped FLUX model through its own stack: frames > 1 is refused by the denoiser and the VAE."""
    with PipelineClient(stack.ports.address("gateway")) as flux:
        error = rpc_error(lambda: flux.generate(PROMPT, num_frames=5, steps=2, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_frames" in error.details()
    message = vae_pb2.DecodeRequest(latents=tensor_codec.encode(torch.zeros(1, 16, 64)), height=64, width=64)
    message.num_frames = 5
    error = rpc_error(lambda: StageClient(stack.ports.address("vae")).vae.Decode(message, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_frames" in error.details()


def test_vae_tiling_is_reported_and_a_clip_within_one_tile_decodes_alike(wan_stack: Stack, wan_model: Path) -> None:
    from factories import cpu_stage

    from ditserve.services.vae.service import VaeService

    clip = denoise(wan_stack, 2)
    message = vae_pb2.DecodeRequest(
        latents=tensor_codec.encode(torch.from_numpy(clip)), height=SIZE, width=SIZE, num_frames=FRAMES
    )
    message.video_format = common_pb2.RAW_FRAMES
    tiled, plain = (VaeService(cpu_stage(wan_model, role="vae"), tiling=tiling) for tiling in (True, False))
    assert tiled.info().details["tiling"] == "True"
    frames = [tensor_codec.decode(vae.Decode(message, None).videos[0].frames) for vae in (tiled, plain)]
    assert torch.equal(*frames)  # 64x64 is one tile: tiling changes nothing below its tile size


def test_http_videos_create_poll_and_download_an_mp4(wan_stack: Stack, tmp_path: Path) -> None:
    """OpenAI's video API shape on the gateway's HTTP port: create, poll, content, delete."""
    base = f"http://127.0.0.1:{wan_stack.ports.http}"
    wait_http(f"{base}/health")
    status, created = http_call(f"{base}/v1/videos", {"prompt": PROMPT, "num_frames": FRAMES, "fps": 8, "seed": 4})
    assert status == 200 and created["object"] == "video" and created["status"] in ("in_progress", "completed")
    deadline = time.monotonic() + 120
    while (job := http_call(f"{base}/v1/videos/{created['id']}")[1])["status"] != "completed":
        assert job["status"] == "in_progress" and time.monotonic() < deadline, job
        time.sleep(0.2)
    assert (job["size"], job["num_frames"], job["progress"], job["seed"]) == (f"{SIZE}x{SIZE}", FRAMES, 100, 4)
    with urllib.request.urlopen(f"{base}/v1/videos/{created['id']}/content", timeout=30) as response:
        assert response.headers["content-type"] == "video/mp4"
        (tmp_path / "clip.mp4").write_bytes(response.read())
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    delete = urllib.request.Request(f"{base}/v1/videos/{created['id']}", method="DELETE")
    with urllib.request.urlopen(delete, timeout=10) as response:
        assert json.loads(response.read())["deleted"] is True
    assert http_call(f"{base}/v1/videos/{created['id']}")[0] == 404


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": PROMPT, "num_frames": 8}, 400, "num_frames"),  # refused at create, not as a failed job
        ({"prompt": PROMPT, "seconds": "soon"}, 400, "seconds"),
        ({"prompt": PROMPT, "frames": 9}, 400, "frames"),
    ],
)
def test_http_video_errors_name_the_field(wan_stack: Stack, body: dict, status: int, param: str) -> None:
    answer_status, answer = http_call(f"http://127.0.0.1:{wan_stack.ports.http}/v1/videos", body)
    assert answer_status == status and answer["error"]["param"] == param, answer


def test_http_images_route_refuses_a_video_model(wan_stack: Stack) -> None:
    status, answer = http_call(f"http://127.0.0.1:{wan_stack.ports.http}/v1/images/generations", {"prompt": PROMPT})
    assert status == 400 and answer["error"]["param"] == "model" and "/v1/videos" in answer["error"]["message"]
