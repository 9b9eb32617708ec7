"""POST /v1/videos, GET /v1/videos/{id}, GET /v1/videos/{id}/content, DELETE /v1/videos/{id}.

The shape of OpenAI's video API (create, poll, download), not a synchronous call: a clip at real sizes
takes minutes, longer than HTTP clients and proxies keep a request open. Create answers once the first
denoising step ran, so a request the gateway or a stage refuses still gets its 400 (naming the field)
at once; later failures (a deadline, a stage that died) show as status "failed" with an OpenAI error.
Jobs live in this process, bounded by --http-max-video-jobs: the oldest finished job makes room for a
new one, and a table full of running jobs answers 429.
"""

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from ditserve.services.gateway.openai_api import HttpError, error_from_rpc
from ditserve.v1 import common_pb2, pipeline_pb2

log = logging.getLogger(__name__)
MEDIA_TYPES = {common_pb2.MP4: "video/mp4", common_pb2.ANIMATED_WEBP: "image/webp"}


@dataclass
class VideoJob:
    id: str
    model: str
    request: pipeline_pb2.GenerateRequest
    status: str = "queued"  # queued | in_progress | completed | failed
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    video: common_pb2.Video | None = None
    seed: int | None = None
    error: dict | None = None
    task: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def body(self) -> dict:
        """OpenAI's Video object, plus what this server knows of the clip."""
        video = self.video
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "size": f"{video.width}x{video.height}" if video else None,
            "seconds": f"{video.num_frames / video.fps:g}" if video and video.fps else None,
            "num_frames": video.num_frames if video else None,
            "fps": video.fps if video else None,
            "seed": self.seed,
            "error": self.error,
        }

    def follow(self, event: pipeline_pb2.GenerateEvent) -> None:
        if event.HasField("progress"):
            progress = event.progress
            if progress.stage == "denoise" and progress.total_steps:
                self.status = "in_progress"
                self.progress = int(99 * progress.step / progress.total_steps)  # 100 once decoded
            return
        result = event.result
        if not result.videos:
            self.fail(500, {"message": "the gateway answered images, not a clip", "type": "server_error"})
            return
        self.video, self.seed = result.videos[0], result.seed
        self.status, self.progress, self.completed_at = "completed", 100, int(time.time())

    def fail(self, status: int, error: dict) -> None:
        self.status, self.completed_at = "failed", int(time.time())
        self.error = {**error, "status": status}


class VideoJobs:
    """The jobs of this gateway, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.jobs: dict[str, VideoJob] = {}

    def add(self, model: str, request: pipeline_pb2.GenerateRequest) -> VideoJob:
        if len(self.jobs) >= self.capacity:
            oldest_finished = next((job for job in self.jobs.values() if job.finished), None)
            if oldest_finished is None:
                raise HttpError(
                    429,
                    f"{self.capacity} videos are being generated (--http-max-video-jobs); retry later",
                    "rate_limit_error",
                )
            del self.jobs[oldest_finished.id]
        job = VideoJob(f"video_{secrets.token_hex(12)}", model, request)
        self.jobs[job.id] = job
        return job

    def get(self, video_id: str) -> VideoJob:
        if video_id not in self.jobs:
            raise HttpError(404, f"video_id: no video {video_id!r} here", "not_found_error", param="video_id")
        return self.jobs[video_id]

    def delete(self, video_id: str) -> VideoJob:
        job = self.get(video_id)
        if job.task is not None and not job.finished:
            job.task.cancel()
        return self.jobs.pop(video_id)


async def start(job: VideoJob, call: Any) -> None:
    """Reads the call until the first denoising step (or the clip) arrives; a refusal before that raises,
    so create answers it. The rest of the stream is read by a task of its own."""
    while not job.finished and job.status != "in_progress":
        event = await call.read()
        if event is grpc.aio.EOF:
            raise HttpError(500, "the gateway ended the stream without a result", "server_error")
        job.follow(event)
    if not job.finished:
        job.task = asyncio.get_running_loop().create_task(_finish(job, call))


async def _finish(job: VideoJob, call: Any) -> None:
    """The rest of the stream (read() as start() began it: grpc.aio cannot mix read() and async for)."""
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            job.follow(event)
        if not job.finished:
            job.fail(500, {"message": "the gateway ended the stream without a result", "type": "server_error"})
    except grpc.aio.AioRpcError as error:
        status, body = error_from_rpc(error.code(), error.details() or "")
        job.fail(status, body["error"])
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception as error:  # a failed job must say so, never stay in_progress
        log.exception("video %s failed", job.id)
        job.fail(500, {"message": f"{type(error).__name__}: {error}", "type": "server_error"})


def content(job: VideoJob) -> tuple[bytes, str]:
    """The clip's bytes and media type; 400 naming video_id until it is completed."""
    if job.status != "completed" or job.video is None:
        raise HttpError(400, f"video_id: {job.id} is {job.status}, not completed", param="video_id")
    return job.video.data, MEDIA_TYPES[job.video.format]
