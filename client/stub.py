"""Sync and asyncio clients: the gateway's Generate, and each stage's RPCs.

`PipelineClient("127.0.0.1:50050").generate("a red circle")` returns PIL images
plus the timing breakdown; `StageClient` exposes one stage's stubs directly.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageSequence

from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.client.tensors import to_numpy
from ditserve.v1 import (
    cache_pb2,
    common_pb2,
    common_pb2_grpc,
    denoiser_pb2_grpc,
    encoder_pb2_grpc,
    pipeline_pb2,
    pipeline_pb2_grpc,
    vae_pb2_grpc,
)

MiB = 1024 * 1024
FORMATS = {"png": common_pb2.PNG, "jpeg": common_pb2.JPEG, "webp": common_pb2.WEBP, "raw": common_pb2.RAW}
VIDEO_FORMATS = {"mp4": common_pb2.MP4, "webp": common_pb2.ANIMATED_WEBP, "raw": common_pb2.RAW_FRAMES}


def channel_options(max_message_mb: int = 256) -> list[tuple[str, int]]:
    size = max_message_mb * MiB
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def to_pil(image: common_pb2.Image) -> Image.Image:
    if image.format == common_pb2.RAW:
        return Image.fromarray(to_numpy(image.pixels, "image.pixels"))
    return Image.open(io.BytesIO(image.data))


def video_frames(video: common_pb2.Video) -> list[Image.Image]:
    """A clip's frames as PIL images: raw frames, animated WebP (Pillow), or MP4 (PyAV: ditserve[serve])."""
    if video.format == common_pb2.RAW_FRAMES:
        return [Image.fromarray(frame) for frame in to_numpy(video.frames, "video.frames")]
    if video.format == common_pb2.ANIMATED_WEBP:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(io.BytesIO(video.data)))]
    import av  # MP4: only a client that decodes it needs PyAV

    with av.open(io.BytesIO(video.data)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@dataclass
class GenerateOutput:
    """images: an image family's pictures. videos: a video family's clips, each a list of PIL frames, with
    the container bytes the VAE wrote in `encoded_videos` (write them to a file as they are)."""

    images: list[Image.Image]
    seed: int
    request_id: str
    timing: common_pb2.Timing
    encoded: list[common_pb2.Image] = field(repr=False, default_factory=list)
    profile_trace: str = ""
    videos: list[list[Image.Image]] = field(default_factory=list)
    encoded_videos: list[common_pb2.Video] = field(repr=False, default_factory=list)


def generate_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    true_cfg_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    output_format: str = "png",
    quality: int = 0,
    max_sequence_length: int = 0,
    request_id: str = "",
    profile_steps: int = 0,
    cache: cache_pb2.CachePolicy | None = None,
    num_frames: int = 0,
    fps: float = 0.0,
    video_format: str = "mp4",
) -> pipeline_pb2.GenerateRequest:
    """0 or None means: the served model's default. num_frames, fps and video_format: video families."""
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {', '.join(VIDEO_FORMATS)}, not {video_format!r}")
    request = pipeline_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        num_images=num_images,
        output_format=FORMATS[output_format],
        quality=quality,
        max_sequence_length=max_sequence_length,
        request_id=request_id,
        profile_steps=profile_steps,
        cache=cache,
        num_frames=num_frames,
        fps=fps,
        video_format=VIDEO_FORMATS[video_format],
    )
    for name, value in (
        ("guidance_scale", guidance_scale),
        ("true_cfg_scale", true_cfg_scale),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


def _output(result: pipeline_pb2.GenerateResult) -> GenerateOutput:
    return GenerateOutput(
        images=[to_pil(image) for image in result.images],
        seed=result.seed,
        request_id=result.request_id,
        timing=result.timing,
        encoded=list(result.images),
        profile_trace=result.profile_trace,
        videos=[video_frames(video) for video in result.videos],
        encoded_videos=list(result.videos),
    )


ProgressCallback = Callable[[pipeline_pb2.Progress], None]


class PipelineClient:
    """Blocking client of the gateway."""

    def __init__(
        self, target: str = "127.0.0.1:50050", max_message_mb: int = 256, security: ClientSecurity = NO_SECURITY
    ) -> None:
        self.channel = security.channel(target, channel_options(max_message_mb))
        self.stub = pipeline_pb2_grpc.PipelineStub(self.channel)
        self.admin = common_pb2_grpc.AdminStub(self.channel)

    def stream(
        self, request: pipeline_pb2.GenerateRequest, timeout: float | None = None
    ) -> Iterator[pipeline_pb2.GenerateEvent]:
        return self.stub.Generate(request, timeout=timeout)

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **settings: Any,
    ) -> GenerateOutput:
        """Runs one request to completion; `settings` are generate_request()'s keywords."""
        for event in self.stream(generate_request(prompt, **settings), timeout=timeout):
            if event.HasField("result"):
                return _output(event.result)
            if on_progress is not None:
                on_progress(event.progress)
        raise RuntimeError("the gateway ended the stream without a result")

    def info(self, timeout: float = 10.0) -> common_pb2.InfoResponse:
        return self.admin.Info(common_pb2.InfoRequest(), timeout=timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_serving(self.channel, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PipelineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPipelineClient:
    """asyncio client of the gateway (grpc.aio)."""

    def __init__(
        self, target: str = "127.0.0.1:50050", max_message_mb: int = 256, security: ClientSecurity = NO_SECURITY
    ) -> None:
        self.channel = security.aio_channel(target, channel_options(max_message_mb))
        self.metadata = security.metadata
        self.stub = pipeline_pb2_grpc.PipelineStub(self.channel)

    def stream(
        self, request: pipeline_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[pipeline_pb2.GenerateEvent]:
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **settings: Any,
    ) -> GenerateOutput:
        async for event in self.stream(generate_request(prompt, **settings), timeout=timeout):
            if event.HasField("result"):
                return _output(event.result)
            if on_progress is not None:
                on_progress(event.progress)
        raise RuntimeError("the gateway ended the stream without a result")

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncPipelineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class StageClient:
    """Stubs of one stage (or any ditserve process) over one channel."""

    def __init__(self, target: str, max_message_mb: int = 256, security: ClientSecurity = NO_SECURITY) -> None:
        self.channel = security.channel(target, channel_options(max_message_mb))
        self.encoder = encoder_pb2_grpc.TextEncoderStub(self.channel)
        self.denoiser = denoiser_pb2_grpc.DenoiserStub(self.channel)
        self.vae = vae_pb2_grpc.VaeDecoderStub(self.channel)
        self.admin = common_pb2_grpc.AdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_serving(self.channel, timeout)

    def close(self) -> Any:
        return self.channel.close()


def wait_serving(channel: grpc.Channel, timeout: float) -> None:
    """Polls grpc.health.v1 until the server says SERVING; raises TimeoutError otherwise."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as error:
            last = error
        time.sleep(0.2)
    raise TimeoutError(f"not SERVING after {timeout:.0f}s (last error: {last})")
