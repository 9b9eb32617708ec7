"""The video API's pure parts: seconds to frames, the body to a GenerateRequest, the bounded job table."""

from __future__ import annotations

import pytest

from ditserve.services.gateway.openai_api import HttpError, VideoGenerationRequest, frames_for, to_video_request
from ditserve.services.gateway.videos import VideoJobs
from ditserve.v1 import common_pb2, pipeline_pb2


@pytest.mark.parametrize(
    ("seconds", "fps", "factor", "frames"),
    [(2, 16, 4, 33), ("5", 16, 4, 81), (0.5, 8, 4, 5), (0.01, 16, 4, 1), (0.75, 8, 2, 7), (0.75, 8, 4, 9)],
)
def test_seconds_become_the_nearest_tk_plus_1(seconds: float | str, fps: float, factor: int, frames: int) -> None:
    assert frames_for(seconds, fps, factor) == frames


@pytest.mark.parametrize("seconds", ["soon", 0, -1])
def test_bad_seconds_name_the_field(seconds: object) -> None:
    with pytest.raises(HttpError) as raised:
        frames_for(seconds, 16, 4)
    assert raised.value.status == 400 and raised.value.body["error"]["param"] == "seconds"


def test_a_video_body_becomes_a_generate_request() -> None:
    body = VideoGenerationRequest(
        prompt="a red circle moving right", seconds=1, size="96x64", seed=3, output_format="webp"
    )
    message = to_video_request(body, default_fps=8.0, temporal_factor=4)
    assert (message.width, message.height, message.num_frames, message.seed) == (96, 64, 9, 3)
    assert message.video_format == common_pb2.ANIMATED_WEBP and message.fps == 0  # the model's own fps
    assert to_video_request(VideoGenerationRequest(prompt="x", num_frames=5, seconds=9), 8.0, 4).num_frames == 5


def test_the_job_table_makes_room_from_finished_jobs_only() -> None:
    jobs = VideoJobs(capacity=2)
    first, second = (jobs.add("m", pipeline_pb2.GenerateRequest()) for _ in range(2))
    with pytest.raises(HttpError) as full:
        jobs.add("m", pipeline_pb2.GenerateRequest())
    assert full.value.status == 429
    first.fail(504, {"message": "deadline", "type": "timeout_error"})
    third = jobs.add("m", pipeline_pb2.GenerateRequest())
    assert list(jobs.jobs) == [second.id, third.id]
    with pytest.raises(HttpError) as missing:
        jobs.get(first.id)
    assert missing.value.status == 404 and missing.value.body["error"]["param"] == "video_id"
