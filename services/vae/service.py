"""VaeDecoder.Decode: unpack latents, decode, and encode each image as asked."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from PIL import Image
from prometheus_client import Histogram

from ditserve.client.tensors import from_numpy
from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import check_frames, check_range, check_size
from ditserve.services.common.metrics import BATCH_BUCKETS
from ditserve.services.common.profiling import trace_range
from ditserve.services.common.stage import StageContext
from ditserve.services.common.timing import elapsed_ms
from ditserve.services.families import load_family
from ditserve.services.vae.coalescer import DecodeCoalescer
from ditserve.services.vae.video import check_video_format, encode_video
from ditserve.v1 import common_pb2, vae_pb2, vae_pb2_grpc

PIL_FORMATS = {common_pb2.PNG: "PNG", common_pb2.JPEG: "JPEG", common_pb2.WEBP: "WEBP"}


def encode_image(pixels: np.ndarray, image_format: int, quality: int) -> common_pb2.Image:
    """pixels: uint8 [height, width, 3]."""
    height, width = pixels.shape[:2]
    if image_format == common_pb2.RAW:
        return common_pb2.Image(format=image_format, pixels=from_numpy(pixels), width=width, height=height)
    buffer = io.BytesIO()
    options = {} if image_format == common_pb2.PNG else {"quality": quality}
    Image.fromarray(pixels).save(buffer, format=PIL_FORMATS[image_format], **options)
    return common_pb2.Image(format=image_format, data=buffer.getvalue(), width=width, height=height)


@dataclass(frozen=True)
class _Decode:
    """One request's validated latents and the size they decode to; frames: (num_frames,) for a clip."""

    latents: torch.Tensor
    height: int
    width: int
    frames: tuple[int, ...]

    @property
    def key(self) -> tuple[object, ...]:
        """Requests decode together only when everything that shapes the call is equal."""
        return (self.height, self.width, self.frames, self.latents.dtype, tuple(self.latents.shape[1:]))


class VaeService(vae_pb2_grpc.VaeDecoderServicer):
    role = "vae"

    def __init__(
        self,
        stage: StageContext,
        tiling: bool = False,
        max_decode_batch: int = 1,
        decode_wait_ms: float = 8.0,
        batched_decode_batch: int = 8,
    ) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        self.decode_batch = Histogram(
            "ditserve_decode_batch_size",
            "Images or clips decoded in one VAE call (a request's own unless it joined others)",
            buckets=BATCH_BUCKETS,
            registry=stage.metrics.registry,
        )
        # one decode call at a time (decoding is memory-hungry), joining requests only where allowed; built
        # first, so a bad setting fails before the model loads
        if batched_decode_batch < 1:
            raise ValueError(f"the batched decode batch must be at least 1, got {batched_decode_batch}")
        # what a decode of a batched denoise may join (coalescer.py), never less than what any may
        self.batched_limit = max(batched_decode_batch, max_decode_batch)
        self.coalescer = DecodeCoalescer(
            lambda group: stage.compute.run(self._decode, group),
            max_decode_batch,
            decode_wait_ms / 1000,
            self.decode_batch.observe,
        )
        self.model = load_family(stage.folder).vae_decoder(stage)
        self.scale = self.model.scale_factor
        self.tiling = tiling
        if tiling:
            self.model.vae.enable_tiling()
        stage.publish_model_info()

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.VaeDecoder"]

    def register(self, server: grpc.Server) -> None:
        vae_pb2_grpc.add_VaeDecoderServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        return self.stage.info(vae_scale_factor=self.scale, tiling=self.tiling, video=self.model.video)

    def close(self) -> None:
        pass

    def _validate(self, request: vae_pb2.DecodeRequest) -> tuple[torch.Tensor, int]:
        """The latents and the frame count they decode to, checked against the family's layout."""
        limits = self.stage.limits
        check_size("height", request.height, limits)
        check_size("width", request.width, limits)
        if self.model.video:
            check_video_format(request.video_format)
            num_frames = request.num_frames or self.stage.folder.defaults.num_frames
            check_frames(limits, request.height, request.width, num_frames, self.model.temporal_factor)
            if request.fps and not 0 < request.fps <= 240:
                raise InvalidArgument("fps", f"{request.fps} is outside (0, 240]")
        else:
            if request.num_frames > 1:
                raise InvalidArgument("num_frames", f"{request.num_frames} frames asked of an image model")
            num_frames = 1
            if request.format not in (*PIL_FORMATS, common_pb2.RAW):
                raise InvalidArgument("format", f"unknown image format {request.format}")
        if request.quality:
            check_range("quality", request.quality, 1, 100)
        latents = tensor_codec.decode(request.latents, "latents")
        if latents.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidArgument("latents.datatype", f"{request.latents.datatype} is not a float datatype")
        if self.model.video:
            self.model.check_latents(latents, request.height, request.width, num_frames)
        else:
            self.model.check_latents(latents, request.height, request.width)
        tensor_codec.check_values(latents, "latents", limits.max_abs_value)
        return latents, num_frames

    def _decode(self, group: list[_Decode]) -> list[np.ndarray]:
        """One VAE call for requests of one key; each request's uint8 outputs."""
        first = group[0]
        with trace_range("decode"):
            latents = torch.cat([member.latents for member in group])
            uint8 = self.model.decode(latents, first.height, first.width, *first.frames)
        return np.split(uint8, np.cumsum([len(member.latents) for member in group])[:-1])

    def Decode(self, request: vae_pb2.DecodeRequest, context: grpc.ServicerContext) -> vae_pb2.DecodeResponse:
        started = time.perf_counter()
        self.metrics.count_bytes("in", request.latents.ByteSize())  # not len(raw_data): a read copies it
        latents, num_frames = self.stage.compute.run(self._validate, request)  # it reads the latents' values
        decode = _Decode(latents, request.height, request.width, (num_frames,) if self.model.video else ())
        validated_ms = elapsed_ms(started)
        limit = self.batched_limit if request.batched else None  # None: --max-decode-batch
        uint8, waited_s = self.coalescer.submit(decode.key, len(latents), decode, limit)
        queue_ms = validated_ms + 1000 * waited_s
        decode_ms = elapsed_ms(started) - queue_ms
        quality = request.quality or 90
        if self.model.video:
            fps = request.fps or self.stage.folder.defaults.fps
            videos = [encode_video(frames, request.video_format, fps, quality) for frames in uint8]
            response = vae_pb2.DecodeResponse(videos=videos)
        else:
            response = vae_pb2.DecodeResponse(images=[encode_image(image, request.format, quality) for image in uint8])
        total = elapsed_ms(started)
        response.timing.CopyFrom(
            common_pb2.Timing(
                queue_ms=queue_ms,
                stage_ms={"decode": decode_ms, "encode_images": total - queue_ms - decode_ms},
                total_ms=total,
            )
        )
        self.metrics.count_bytes("out", response.ByteSize())
        return response
