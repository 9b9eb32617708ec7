"""Does a clip show what its moving-shapes prompt asks for? The image judge per frame, plus a motion track.

Method, per clip (frames of training/motion.py's clips, or a generator's):
1. each frame is read by the image judge (eval/fidelity.py `read`): its colour, shape and background,
   and the shape's pixel mask;
2. colour, shape and background are each the value a strict majority of frames shows, else None
   (wrong). A majority rather than every frame: one frame misread through blur, or the Wan VAE's lone
   first frame (encoded without its neighbours), does not sink a clip that shows the right thing
   throughout; rather than the first frame or a plurality: a clip must show one consistent thing;
3. direction, from the track of the mask's centroid over the frames that have one (a strict majority
   must): the least-squares slope of x and of y against the frame's time t = index / (frames - 1), so
   the slope is the travel over the whole clip as a fraction of the frame side, like motion.py's
   TRAVEL_RANGE. The axis with the larger slope and its sign name the direction; a clip whose larger
   slope is under STILL_TRAVEL is "still" (wrong for every prompt).
Least squares rather than first-to-last: every frame's centroid counts, so one misplaced mask moves the
estimate by a ninth, not all of it. No threshold is fitted to a generator (see STILL_TRAVEL).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ditserve.services.tools.eval.fidelity import ATTRIBUTES as FRAME_ATTRIBUTES
from ditserve.services.tools.eval.fidelity import read, summarize, verdicts
from ditserve.services.tools.training.motion import DIRECTIONS, TRAVEL_RANGE, parse_prompt

VOCABULARY = "moving-shapes"  # the prompt_vocabulary in ditserve.json of a model this judge reads
ATTRIBUTES = (*FRAME_ATTRIBUTES, "direction")
STILL = "still"
# Halfway between a still shape (travel 0) and the dataset's slowest clip (TRAVEL_RANGE[0] of the side,
# 16 px at 64x64): a clip moving less than 8 px over its length at 64x64 is judged still.
STILL_TRAVEL = TRAVEL_RANGE[0] / 2


def _majority(values: Sequence[str | None]) -> str | None:
    """The value more than half of values are, else None."""
    value, count = Counter(values).most_common(1)[0]
    return value if count * 2 > len(values) else None


def direction_of(track: Sequence[tuple[int, float, float] | None], num_frames: int) -> str | None:
    """A direction name (or STILL) from per-frame (index, x, y) centroids in fractions of the side,
    None for frames without a shape; None when no strict majority of frames has one."""
    points = [point for point in track if point is not None]
    if num_frames < 2 or len(points) * 2 <= num_frames:
        return None
    index, x, y = np.array(points, dtype=np.float64).T
    t = index / (num_frames - 1)
    slopes = np.polyfit(t, np.stack([x, y], axis=1), 1)[0]  # travel over the clip along x and along y
    axis = int(np.argmax(np.abs(slopes)))
    if abs(slopes[axis]) < STILL_TRAVEL:
        return STILL
    step = [0, 0]
    step[axis] = int(np.sign(slopes[axis]))
    return next(name for name, unit in DIRECTIONS.items() if list(unit) == step)


def predict_clip(frames: Sequence[Image.Image]) -> dict[str, str | None]:
    """The attributes a clip shows: majority colour, shape and background, and the direction of motion."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    readings = [read(frame) for frame in frames]
    predicted = {name: _majority([seen[name] for seen, _ in readings]) for name in FRAME_ATTRIBUTES}
    track = []
    for index, (_, mask) in enumerate(readings):
        if mask is None:
            track.append(None)
            continue
        ys, xs = np.nonzero(mask)
        # Pixel centres, as fractions of the side (motion.py's coordinates).
        track.append((index, (xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]))
    predicted["direction"] = direction_of(track, len(frames))
    return predicted


def score_video(frames: Sequence[Image.Image], prompt: str) -> dict[str, Any]:
    """Per-attribute correctness of one clip against its prompt, "all" of them, and what was predicted:
    the image judge's result shape plus "direction". The entry point for scoring one clip."""
    return verdicts(predict_clip(frames), parse_prompt(prompt), ATTRIBUTES)


def score_batch(clips: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> dict[str, float | int]:
    """Accuracy per attribute (direction included) and for all at once, over paired clips and prompts."""
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    return summarize([score_video(clip, prompt) for clip, prompt in zip(clips, prompts, strict=True)])
