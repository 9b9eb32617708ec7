"""The video judge: right on rendered and on blurred, noisy clips; reversed, still or mislabelled clips
score as wrong.

Measured when written: all 560 clips of all_clip_combinations (seeds 0 and 1) 100% on every
attribute, and the same clips played backwards 0% on direction and 100% on the rest; every 7th
combination blurred per frame with radius 1.5 px plus noise of sigma 8: 100% (radius 2.0: 82.5%, the
image judge's triangles turning into circles; direction stays 100%). The tests use every 7th
combination (7 is coprime to the 4 directions and 5 backgrounds, so each occurs) to stay fast.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ditserve.services.tools.eval.video_fidelity import STILL, STILL_TRAVEL, direction_of, score_batch, score_video
from ditserve.services.tools.training.motion import TRAVEL_RANGE, ClipSpec, all_clip_combinations, render_clip

ATTRIBUTE_KEYS = ("color", "shape", "background", "direction", "all")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PERPENDICULAR = {"left": "up", "right": "down", "up": "right", "down": "left"}


@pytest.fixture(scope="module")
def specs() -> list[ClipSpec]:
    return all_clip_combinations(0)[::7]


@pytest.fixture(scope="module")
def clips(specs: list[ClipSpec]) -> list[list[Image.Image]]:
    return [render_clip(spec) for spec in specs]


def test_rendered_clips_score_right(specs: list[ClipSpec], clips: list[list[Image.Image]]) -> None:
    assert {spec.direction for spec in specs} == set(OPPOSITE) and len(specs) == 80
    summary = score_batch(clips, [spec.prompt for spec in specs])
    assert summary == {key: 1.0 for key in ATTRIBUTE_KEYS} | {"n": len(specs)}


def test_blurred_noisy_clips_score_right(specs: list[ClipSpec], clips: list[list[Image.Image]]) -> None:
    """A stand-in for a small VAE's output, frame by frame: Gaussian blur, then pixel noise."""
    rng = np.random.default_rng(0)

    def degrade(frame: Image.Image) -> Image.Image:
        pixels = np.asarray(frame.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(pixels + rng.normal(0, 8.0, pixels.shape)), 0, 255).astype(np.uint8))

    summary = score_batch([[degrade(frame) for frame in clip] for clip in clips], [spec.prompt for spec in specs])
    assert all(summary[key] >= 0.97 for key in ATTRIBUTE_KEYS), summary


def test_a_clip_played_backwards_moves_the_other_way(specs: list[ClipSpec], clips: list[list[Image.Image]]) -> None:
    for spec, clip in zip(specs, clips, strict=True):
        scores = score_video(clip[::-1], spec.prompt)
        assert scores["color"] and scores["shape"] and scores["background"], scores
        assert not scores["direction"] and not scores["all"]
        assert scores["predicted"]["direction"] == OPPOSITE[spec.direction]


@pytest.mark.parametrize("turn", [OPPOSITE, PERPENDICULAR])
def test_a_wrong_direction_in_the_prompt_scores_wrong(
    specs: list[ClipSpec], clips: list[list[Image.Image]], turn: dict[str, str]
) -> None:
    for spec, clip in zip(specs[::4], clips[::4], strict=True):
        prompt = dataclasses.replace(spec.attributes, direction=turn[spec.direction]).prompt
        scores = score_video(clip, prompt)
        assert not scores["direction"] and not scores["all"], (prompt, scores)


def test_a_still_shape_is_judged_still(specs: list[ClipSpec], clips: list[list[Image.Image]]) -> None:
    scores = score_video([clips[0][4]] * len(clips[0]), specs[0].prompt)
    assert scores["predicted"]["direction"] == STILL and not scores["all"]


def test_a_shape_moving_under_the_still_travel_is_still(specs: list[ClipSpec]) -> None:
    """STILL_TRAVEL sits halfway between no motion and the dataset's slowest clip: just under it is still,
    the slowest clip the dataset makes is not."""
    slow = dataclasses.replace(specs[0], travel=STILL_TRAVEL * 0.8)
    assert score_video(render_clip(slow), slow.prompt)["predicted"]["direction"] == STILL
    slowest = dataclasses.replace(specs[0], travel=TRAVEL_RANGE[0])
    assert score_video(render_clip(slowest), slowest.prompt)["all"]


def test_attributes_are_a_majority_over_frames(specs: list[ClipSpec], clips: list[list[Image.Image]]) -> None:
    """One frame of another shape does not change a clip's verdict; most frames of another shape do; a
    clip showing three shapes in turn shows none."""
    assert specs[0].shape == "circle"
    square, ring = (render_clip(dataclasses.replace(specs[0], shape=shape)) for shape in ("square", "ring"))
    assert score_video([square[0], *clips[0][1:]], specs[0].prompt)["all"]
    assert score_video(clips[0][:4] + square[4:], specs[0].prompt)["predicted"]["shape"] == "square"
    scores = score_video(clips[0][:3] + square[3:6] + ring[6:], specs[0].prompt)
    assert scores["predicted"]["shape"] is None and scores["direction"] and not scores["all"]


def test_direction_needs_a_shape_in_most_frames() -> None:
    track = [(0, 0.2, 0.5), (1, 0.3, 0.5), None, None]
    assert direction_of(track, 4) is None
    assert direction_of([(0, 0.5, 0.7), (1, 0.5, 0.5), (2, 0.5, 0.3)], 3) == "up"


def test_clips_and_prompts_must_pair(clips: list[list[Image.Image]], specs: list[ClipSpec]) -> None:
    with pytest.raises(ValueError, match="2 clips but 1 prompts"):
        score_batch(clips[:2], [specs[0].prompt])
