"""Procedural "a red circle on a blue background" images: an infinite, seeded, checkable dataset.

Every image is one flat-coloured shape on a flat background, so a generated image can be judged
attribute by attribute (colour, shape, background) by ditserve.services.tools.eval.fidelity without a
learned model. Colours and shapes are chosen to stay distinguishable after the blur of a small VAE.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Every colour name the prompts use, foreground or background. Pairwise RGB distance >= 86.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
FOREGROUNDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "blue", "green")
# Told apart by geometry that survives blur: hole (ring), solidity (cross), bounding-box fill (the rest).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
# Anchor of the shape centre, as fractions of the image side (x to the right, y down).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}

# Shape diameter as a fraction of the image side: large enough to classify at 64x64.
SIZE_RANGE = (0.4, 0.7)
# A positioned shape must leave room to be visibly off-centre.
POSITIONED_SIZE_RANGE = (0.4, 0.5)
POSITION_JITTER = 0.04
# Clear border around every shape, so the image border is pure background.
MARGIN = 0.04
# Probability that a training sample names a position.
POSITION_PROBABILITY = 0.5
SUPERSAMPLE = 4

_PROMPT_RE = re.compile(
    r"an? (?P<color>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background(?: in the (?P<position>.+))?"
)


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


@dataclass(frozen=True)
class Attributes:
    """What a prompt asks for: the part of a spec a scorer can check."""

    color: str
    shape: str
    background: str
    position: str | None

    def __post_init__(self) -> None:
        for field, value, known in (
            ("colour", self.color, FOREGROUNDS),
            ("shape", self.shape, SHAPES),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in known:
                raise ValueError(f"unknown {field} {value!r} (known: {', '.join(known)})")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r} (known: {', '.join(POSITIONS)})")
        if self.color == self.background:
            raise ValueError(f"colour and background are both {self.color!r}: the shape would be invisible")

    @property
    def prompt(self) -> str:
        text = f"{with_article(self.color)} {self.shape} on {with_article(self.background)} background"
        return text if self.position is None else f"{text} in the {self.position}"


@dataclass(frozen=True)
class ShapeSpec(Attributes):
    """Attributes plus the jitter that makes each render of a prompt different.

    size is the shape's diameter (its width; a triangle is shorter than wide) and (cx, cy) its centre,
    all as fractions of the image side, so one spec renders the same picture at any resolution.
    """

    size: float
    cx: float
    cy: float

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.color, self.shape, self.background, self.position)


def parse_prompt(prompt: str) -> Attributes:
    """Inverse of Attributes.prompt; the ValueError names the part it could not parse."""
    match = _PROMPT_RE.fullmatch(prompt.strip().lower())
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} is not of the form 'a <colour> <shape> on a <background> background"
            " [in the <position>]'"
        )
    try:
        return Attributes(**match.groupdict())
    except ValueError as err:
        raise ValueError(f"prompt {prompt!r}: {err}") from err


def _jittered(rng: np.random.Generator, attributes: Attributes) -> ShapeSpec:
    """Draw size and centre; the shape always stays MARGIN inside the image."""
    low, high = SIZE_RANGE if attributes.position is None else POSITIONED_SIZE_RANGE
    size = float(rng.uniform(low, high))
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    if attributes.position is None:
        cx, cy = rng.uniform(lo, hi, size=2)
    else:
        anchor = np.array(POSITIONS[attributes.position])
        cx, cy = np.clip(anchor + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2), lo, hi)
    return ShapeSpec(**vars(attributes), size=size, cx=float(cx), cy=float(cy))


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """One uniformly drawn training spec; about half of them name a position."""
    color = str(rng.choice(FOREGROUNDS))
    background = str(rng.choice([name for name in BACKGROUNDS if name != color]))
    shape = str(rng.choice(SHAPES))
    position = str(rng.choice(list(POSITIONS))) if rng.random() < POSITION_PROBABILITY else None
    return _jittered(rng, Attributes(color, shape, background, position))


def all_combinations(seed: int = 0) -> list[ShapeSpec]:
    """Every colour x shape x background once, in a fixed order: the evaluation prompt list."""
    rng = np.random.default_rng(seed)
    return [
        _jittered(rng, Attributes(color, shape, background, None))
        for color in FOREGROUNDS
        for shape in SHAPES
        for background in BACKGROUNDS
        if background != color
    ]


def render(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """Draw at SUPERSAMPLE x and box-downsample: exact-coverage antialiasing, no ringing halo."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[spec.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[spec.color]
    cx, cy, r = spec.cx * big, spec.cy * big, spec.size * big / 2
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "triangle":
        half_height = r * math.sqrt(3) / 2
        base = cy + half_height
        draw.polygon([(cx, cy - half_height), (cx + r, base), (cx - r, base)], fill=fill)
    elif spec.shape == "cross":
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:  # ring: Attributes already rejected any other shape
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=COLORS[spec.background])
    return image.resize((size, size), Image.Resampling.BOX)


def iter_samples(seed: int, size: int = 64) -> Iterator[tuple[ShapeSpec, Image.Image]]:
    """Endless (spec, image) pairs; the same seed gives the same stream."""
    rng = np.random.default_rng(seed)
    while True:
        spec = sample_spec(rng)
        yield spec, render(spec, size)
