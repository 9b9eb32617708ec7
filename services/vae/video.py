"""Clips as the VAE answers them: MP4 (H.264, yuv420p) through PyAV, animated WebP through Pillow, or raw
frames.

PyAV's wheels carry FFmpeg with libx264, so no system FFmpeg is needed; FFmpeg cannot read animated WebP
back, so WebP is Pillow's (which reads and writes it). Nothing here writes container bytes by hand.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from ditserve.client.tensors import from_numpy
from ditserve.services.common.errors import InvalidArgument
from ditserve.v1 import common_pb2

FORMATS = (common_pb2.MP4, common_pb2.ANIMATED_WEBP, common_pb2.RAW_FRAMES)


def check_video_format(video_format: int) -> None:
    if video_format not in FORMATS:
        raise InvalidArgument("video_format", f"unknown video format {video_format}")


def encode_video(frames: np.ndarray, video_format: int, fps: float, quality: int) -> common_pb2.Video:
    """frames: uint8 [num_frames, height, width, 3]; quality 1-100 maps onto the codec's own scale."""
    num_frames, height, width = frames.shape[:3]
    video = common_pb2.Video(format=video_format, width=width, height=height, num_frames=num_frames, fps=fps)
    if video_format == common_pb2.RAW_FRAMES:
        video.frames.CopyFrom(from_numpy(frames))
    elif video_format == common_pb2.MP4:
        video.data = _mp4(frames, fps, quality)
    else:
        video.data = _webp(frames, fps, quality)
    return video


def _mp4(frames: np.ndarray, fps: float, quality: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(round(51 * (100 - quality) / 99))}  # quality 100 -> CRF 0 (lossless)
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _webp(frames: np.ndarray, fps: float, quality: int) -> bytes:
    buffer = io.BytesIO()
    first, *rest = (Image.fromarray(pixels) for pixels in frames)
    first.save(
        buffer, format="WEBP", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0, quality=quality
    )
    return buffer.getvalue()
