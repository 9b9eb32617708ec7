"""Does an image show what its shapes-dataset prompt asks for? A fixed geometric judge, no learned model.

Method, per image:
1. background: per-channel median of a thin border frame (the dataset keeps shapes off the border),
   named by the nearest palette colour;
2. foreground colour: median of the pixels farthest from the background (distance >= 3/4 of the
   99th percentile: the shape's core, untouched by blur), named by the nearest palette colour;
   if that name is the background's, the image shows no shape;
3. mask: each pixel's position on the background->foreground colour axis, 3x3-averaged against
   noise and cut at 1/2, i.e. the shape's edge as a symmetric blur leaves it; only the largest
   4-connected component is kept, and one under 1% of the image is no shape;
4. shape, from scale-free geometry of that component, in this order: background enclosed by it
   (ring); solidity = area / convex-hull area (cross); fill = area / bounding-box area (square);
   an affine-invariant second-moment ratio (triangle, else circle).
Every threshold sits halfway between the ideal values of the classes it separates (see below), so
nothing is fitted to any generator's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ditserve.services.tools.training.shapes import COLORS, parse_prompt

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)

# Border frame width as a fraction of the image side: 2 px at 64x64, inside the dataset's margin.
BORDER_FRACTION = 1 / 32
# A component smaller than this fraction of the image is a speck, not a shape.
MIN_AREA_FRACTION = 0.01
# Enclosed background / filled area: ring 1/4 (inner diameter 1/2), solid shapes 0.
HOLE_THRESHOLD = (1 / 4 + 0) / 2
# Area / convex-hull area: cross (arm width 1/3) 5/7, convex shapes 1.
SOLIDITY_THRESHOLD = (5 / 7 + 1) / 2
# Area / bounding-box area: square 1, circle pi/4 (triangle 1/2, below both).
SQUARE_FILL_THRESHOLD = (1 + math.pi / 4) / 2
# det(covariance of pixel coordinates) * (4 pi / area)^2, an affine invariant: any ellipse 1, any
# triangle 16 pi^2 / 108 ~ 1.46.
TRIANGLE_MOMENT_THRESHOLD = (1 + 16 * math.pi**2 / 108) / 2

ATTRIBUTES = ("color", "shape", "background")


def _nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _box_mean(values: np.ndarray) -> np.ndarray:
    """3x3 mean: cuts pixel noise 3x and, being symmetric, leaves a straight edge's 1/2 level in place."""
    padded = np.pad(values, 1, mode="edge")
    rows, cols = values.shape
    return sum(padded[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)) / 9


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected components: each pixel of mask gets the smallest flat index in its component.

    Numpy min-propagation over neighbours, plus pointer jumping (a pixel takes its label's label) so
    it converges in a handful of steps rather than one per pixel of path; pixels outside mask get
    mask.size.
    """
    outside = mask.size
    # labels[outside] = outside lets pointer jumping index with any label.
    labels = np.full(mask.size + 1, outside)
    labels[:-1][mask.ravel()] = np.flatnonzero(mask)
    padded = np.full((mask.shape[0] + 2, mask.shape[1] + 2), outside)
    while True:
        padded[1:-1, 1:-1] = labels[:-1].reshape(mask.shape)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = labels[np.where(mask, neighbours, outside).ravel()]
        if np.array_equal(updated, labels[:-1]):
            return updated.reshape(mask.shape)
        labels[:-1] = updated


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    labels = _label(mask)
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """Pixels outside mask that no path outside mask connects to the image border: holes."""
    labels = _label(~mask)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return ~mask & ~np.isin(labels, border)


def _hull_area(mask: np.ndarray) -> float:
    """Convex-hull area of the mask's pixel squares (monotone chain over each row's end corners)."""
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    ends = zip(rows.tolist(), first.tolist(), last.tolist(), strict=True)
    points = sorted({(x, y) for row, left, right in ends for x in (left, right) for y in (row, row + 1)})

    def half(sequence: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in sequence:
            while len(chain) >= 2:
                (ox, oy), (ax, ay) = chain[-2], chain[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half(points) + half(points[::-1])
    xs, ys = np.array(hull).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _classify_shape(mask: np.ndarray) -> str:
    holes = _enclosed(mask).sum()
    filled = mask.sum() + holes
    if holes / filled > HOLE_THRESHOLD:
        return "ring"
    if mask.sum() / _hull_area(mask) < SOLIDITY_THRESHOLD:
        return "cross"
    ys, xs = np.nonzero(mask)
    if filled / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)) > SQUARE_FILL_THRESHOLD:
        return "square"
    # Second moments rather than the bounding box: blur eats a triangle's apex, which shortens its
    # box a lot but barely moves its moments.
    moment_ratio = np.linalg.det(np.cov(np.stack([xs, ys]), bias=True)) * (4 * np.pi / xs.size) ** 2
    return "triangle" if moment_ratio > TRIANGLE_MOMENT_THRESHOLD else "circle"


def read(image: Image.Image) -> tuple[dict[str, str | None], np.ndarray | None]:
    """The attributes an image shows and the shape's pixel mask (None with no shape, only specks; colour
    and shape are None then too). The video judge tracks the mask's centroid from frame to frame."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    width = max(1, round(min(pixels.shape[:2]) * BORDER_FRACTION))
    frame = np.concatenate(
        [
            pixels[:width].reshape(-1, 3),
            pixels[-width:].reshape(-1, 3),
            pixels[:, :width].reshape(-1, 3),
            pixels[:, -width:].reshape(-1, 3),
        ]
    )
    background = np.median(frame, axis=0)
    predicted: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    predicted["background"] = _nearest_color(background)
    distance = np.linalg.norm(pixels - background, axis=2)
    foreground = np.median(pixels[distance >= 0.75 * np.percentile(distance, 99)], axis=0)
    color = _nearest_color(foreground)
    if color == predicted["background"]:  # the most distinct pixels are background plus noise
        return predicted, None
    axis = foreground - background
    mask = _largest_component(_box_mean((pixels - background) @ axis / (axis @ axis)) > 0.5)
    if mask.sum() < MIN_AREA_FRACTION * mask.size:
        return predicted, None
    predicted.update(color=color, shape=_classify_shape(mask))
    return predicted, mask


def predict(image: Image.Image) -> dict[str, str | None]:
    """The attributes an image shows; colour and shape are None when there is no shape, only specks."""
    return read(image)[0]


def score_image(image: Image.Image, prompt: str) -> dict[str, Any]:
    """Per-attribute correctness against the prompt, "all" of them, and what was predicted."""
    return verdicts(predict(image), parse_prompt(prompt), ATTRIBUTES)


def verdicts(predicted: dict[str, str | None], wanted: object, attributes: Sequence[str]) -> dict[str, Any]:
    """Whether each attribute predicted is the one wanted (a parsed prompt), "all" of them, and predicted."""
    scores: dict[str, Any] = {name: predicted[name] == getattr(wanted, name) for name in attributes}
    scores["all"] = all(scores[name] for name in attributes)
    scores["predicted"] = predicted
    return scores


def score_batch(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float | int]:
    """Accuracy per attribute and for all attributes at once, over paired images and prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return summarize([score_image(image, prompt) for image, prompt in zip(images, prompts, strict=True)])


def summarize(scores: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """score_batch's accuracies from score_image results already in hand: one per verdict the results
    carry (this judge's attributes and "all"; the video judge's add "direction")."""
    if not scores:
        raise ValueError("no images to score")
    verdicts = [name for name, value in scores[0].items() if isinstance(value, bool)]
    summary: dict[str, float | int] = {name: sum(score[name] for score in scores) / len(scores) for name in verdicts}
    summary["n"] = len(scores)
    return summary
