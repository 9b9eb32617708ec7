"""Procedural "a red circle moving right on a blue background" clips: the video twin of shapes.py.

Every clip is one flat-coloured shape gliding in a straight line, at constant speed, across a flat
background, so a generated clip can be judged frame by frame (colour, shape, background: the image
judge) and as a whole (direction: from the track of the shape's centroid) without a learned model.
The vocabulary is the image dataset's colours, shapes and backgrounds plus four directions.

Clip geometry, as fractions of the frame side: the shape's diameter is drawn from SIZE_RANGE and the
whole path (start to end) from TRAVEL_RANGE, and the start is drawn so the shape stays MARGIN inside
the frame for the whole clip. The travel is long enough that the centroid moves several pixels at
64x64 (a judge sees it through blur) and short enough that the shape is never cut by the border.
The shapes are as large as that leaves room for: at 8x spatial compression a shape of 0.3-0.42 of
the side spans 2-3 latent pixels, and the first shipped VAE, trained on those, gave back a shape the
judge recognised on 50% of held-out clips; the same VAE, untrained on them, on 94% of clips of 0.45-0.55
and 100% of 0.55-0.65 (so size, not the VAE's training, decided it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ditserve.services.tools.training.shapes import (
    BACKGROUNDS,
    FOREGROUNDS,
    MARGIN,
    SHAPES,
    Attributes,
    ShapeSpec,
    render,
    with_article,
)

# Unit steps in image coordinates (x to the right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUM_FRAMES = 9
FPS = 8.0
SIZE_RANGE = (0.5, 0.6)
TRAVEL_RANGE = (0.2, 0.3)

_PROMPT_RE = re.compile(
    r"an? (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) on an? (?P<background>\w+) background"
)


@dataclass(frozen=True)
class MotionAttributes:
    """What a clip's prompt asks for: the part of a spec the video judge can check."""

    color: str
    shape: str
    background: str
    direction: str

    def __post_init__(self) -> None:
        Attributes(self.color, self.shape, self.background, None)  # validates the still part
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r} (known: {', '.join(DIRECTIONS)})")

    @property
    def prompt(self) -> str:
        return (
            f"{with_article(self.color)} {self.shape} moving {self.direction}"
            f" on {with_article(self.background)} background"
        )


@dataclass(frozen=True)
class ClipSpec(MotionAttributes):
    """Attributes plus the jitter that makes each render of a prompt different: size, start, travel."""

    size: float
    x0: float
    y0: float
    travel: float

    @property
    def attributes(self) -> MotionAttributes:
        return MotionAttributes(self.color, self.shape, self.background, self.direction)

    def centre(self, frame: int, num_frames: int = NUM_FRAMES) -> tuple[float, float]:
        """The shape's centre in frame `frame` of num_frames: start + travel * t, t from 0 to 1."""
        t = frame / max(1, num_frames - 1)
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.travel * t, self.y0 + dy * self.travel * t


def parse_prompt(prompt: str) -> MotionAttributes:
    """Inverse of MotionAttributes.prompt; the ValueError names the part it could not parse."""
    match = _PROMPT_RE.fullmatch(prompt.strip().lower())
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} is not of the form 'a <colour> <shape> moving <direction> on a <background> background'"
        )
    try:
        return MotionAttributes(**match.groupdict())
    except ValueError as err:
        raise ValueError(f"prompt {prompt!r}: {err}") from err


def _jittered(rng: np.random.Generator, attributes: MotionAttributes) -> ClipSpec:
    """Draw size, travel and a start from which the whole path stays MARGIN inside the frame."""
    size = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE))
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    dx, dy = DIRECTIONS[attributes.direction]
    # Along the motion axis the start leaves room for the travel; across it, anywhere inside.
    x0 = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    y0 = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    return ClipSpec(**vars(attributes), size=size, x0=float(x0), y0=float(y0), travel=travel)


def sample_clip_spec(rng: np.random.Generator) -> ClipSpec:
    """One uniformly drawn training spec."""
    color = str(rng.choice(FOREGROUNDS))
    background = str(rng.choice([name for name in BACKGROUNDS if name != color]))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    return _jittered(rng, MotionAttributes(color, shape, background, direction))


def all_clip_combinations(seed: int = 0) -> list[ClipSpec]:
    """Every colour x shape x background x direction once, in a fixed order (560 clips)."""
    rng = np.random.default_rng(seed)
    return [
        _jittered(rng, MotionAttributes(color, shape, background, direction))
        for color in FOREGROUNDS
        for shape in SHAPES
        for background in BACKGROUNDS
        if background != color
        for direction in DIRECTIONS
    ]


def render_clip(spec: ClipSpec, size: int = 64, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """num_frames frames of size x size, each drawn by the image renderer at that frame's centre."""
    frames = []
    for index in range(num_frames):
        cx, cy = spec.centre(index, num_frames)
        still = ShapeSpec(spec.color, spec.shape, spec.background, None, size=spec.size, cx=cx, cy=cy)
        frames.append(render(still, size))
    return frames


def iter_clips(seed: int, size: int = 64, num_frames: int = NUM_FRAMES) -> Iterator[tuple[ClipSpec, list[Image.Image]]]:
    """Endless (spec, frames) pairs; the same seed gives the same stream."""
    rng = np.random.default_rng(seed)
    while True:
        spec = sample_clip_spec(rng)
        yield spec, render_clip(spec, size, num_frames)
