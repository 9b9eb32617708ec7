"""Clips as the VAE answers them: an MP4 (H.264, yuv420p) or animated WebP through PyAV, or raw frames.

PyAV's wheels carry FFmpeg with libx264 and libwebp, so no system FFmpeg is needed; nothing here writes
container bytes by hand.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from ditserve.client.tensors import from_numpy
from ditserve.services.common.errors import InvalidArgument
from ditserve.v1 import common_pb2

# format -> (PyAV container, codec, pixel format)
CONTAINERS = {
    common_pb2.MP4: ("mp4", "libx264", "yuv420p"),
    common_pb2.ANIMATED_WEBP: ("webp", "libwebp", "yuv420p"),
}


def check_video_format(video_format: int) -> None:
    if video_format not in (*CONTAINERS, common_pb2.RAW_FRAMES):
        raise InvalidArgument("video_format", f"unknown video format {video_format}")


def encode_video(frames: np.ndarray, video_format: int, fps: float, quality: int) -> common_pb2.Video:
    """frames: uint8 [num_frames, height, width, 3]; quality 1-100 maps onto the codec's own scale."""
    num_frames, height, width = frames.shape[:3]
    video = common_pb2.Video(format=video_format, width=width, height=height, num_frames=num_frames, fps=fps)
    if video_format == common_pb2.RAW_FRAMES:
        video.frames.CopyFrom(from_numpy(frames))
        return video
    container_format, codec, pixel_format = CONTAINERS[video_format]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        if codec == "libx264":  # CRF 51 (worst) .. 0 (lossless) from quality 1..100
            stream.options = {"crf": str(round(51 * (100 - quality) / 99))}
        else:
            stream.options = {"quality": str(quality), "loop": "0"}
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(stream.encode())
    video.data = buffer.getvalue()
    return video
