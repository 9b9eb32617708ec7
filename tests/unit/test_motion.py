"""The moving-shapes clips: prompts round-trip, paths stay inside the frame, shapes move as told."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve.services.tools.training import motion
from ditserve.services.tools.training.shapes import COLORS, MARGIN


def _centroid(frame: np.ndarray, background: str) -> np.ndarray:
    """Mean position of the pixels that differ from the background colour."""
    mask = np.abs(frame.astype(int) - COLORS[background]).sum(axis=2) > 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_every_combination_round_trips_through_its_prompt() -> None:
    specs = motion.all_clip_combinations()
    assert len(specs) == 28 * 5 * 4  # colour-background pairs (blue and green are both) x shapes x directions
    assert len({spec.prompt for spec in specs}) == len(specs)
    for spec in specs:
        assert motion.parse_prompt(spec.prompt) == spec.attributes


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ("a red circle moving sideways on a blue background", "direction"),
        ("a red circle on a blue background", "form"),
        ("a red circle moving left on a red background", "both"),
    ],
)
def test_bad_prompts_say_what_is_wrong(prompt: str, field: str) -> None:
    with pytest.raises(ValueError, match={"direction": "sideways", "form": "moving <direction>", "both": "red"}[field]):
        motion.parse_prompt(prompt)


def test_the_whole_path_stays_inside_the_margin() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spec = motion.sample_clip_spec(rng)
        for frame in (0, motion.NUM_FRAMES - 1):
            for centre in spec.centre(frame):
                assert spec.size / 2 + MARGIN - 1e-9 <= centre <= 1 - spec.size / 2 - MARGIN + 1e-9


@pytest.mark.parametrize("direction", list(motion.DIRECTIONS))
def test_the_shape_moves_its_travel_in_the_named_direction(direction: str) -> None:
    attributes = motion.MotionAttributes("red", "square", "blue", direction)
    spec = motion._jittered(np.random.default_rng(1), attributes)
    frames = [np.asarray(frame) for frame in motion.render_clip(spec)]
    assert len(frames) == motion.NUM_FRAMES and frames[0].shape == (64, 64, 3)
    moved = _centroid(frames[-1], "blue") - _centroid(frames[0], "blue")
    np.testing.assert_allclose(moved, np.array(motion.DIRECTIONS[direction]) * spec.travel * 64, atol=0.5)


def test_the_same_seed_gives_the_same_clips() -> None:
    first, second = motion.iter_clips(7), motion.iter_clips(7)
    for _ in range(3):
        (spec_a, frames_a), (spec_b, frames_b) = next(first), next(second)
        assert spec_a == spec_b
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames_a, frames_b, strict=True))
