"""A labelled grid of generated images or clips: what the README shows and what a person checks by eye."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PASS_COLOR = (40, 160, 60)
FAIL_COLOR = (200, 40, 40)


def sample_grid(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    passed: Sequence[bool],
    columns: int = 6,
    scale: int = 2,
) -> Image.Image:
    """Each image upscaled `scale`x (nearest, so nothing is smoothed), its prompt below, framed green
    when the fidelity judge passed it and red when it did not. Images share the first one's size."""
    if not (len(images) == len(prompts) == len(passed)) or not images:
        raise ValueError("need the same, non-zero number of images, prompts and verdicts")
    width, height = images[0].width * scale, images[0].height * scale
    font = ImageFont.load_default(size=11)
    label_lines = 3
    cell_w, cell_h = width + 16, height + 12 + 13 * label_lines
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, prompt, ok) in enumerate(zip(images, prompts, passed, strict=True)):
        x, y = (index % columns) * cell_w + 8, (index // columns) * cell_h + 6
        draw.rectangle((x - 3, y - 3, x + width + 2, y + height + 2), fill=PASS_COLOR if ok else FAIL_COLOR)
        grid.paste(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (x, y))
        wrapped = textwrap.wrap(prompt, width=max(8, width // 6))[:label_lines]
        for line_index, line in enumerate(wrapped):
            draw.text((x, y + height + 5 + 13 * line_index), line, fill="black", font=font)
    return grid


def clip_strip(frames: Sequence[Image.Image], gap: int = 2) -> Image.Image:
    """A clip's first, middle and last frame side by side on white: one grid cell per clip, so
    sample_grid(strips, ..., columns=1) shows one clip per row with its prompt and verdict."""
    picked = [frames[0], frames[len(frames) // 2], frames[-1]]
    side = picked[0].width
    strip = Image.new("RGB", (3 * side + 2 * gap, picked[0].height), "white")
    for index, frame in enumerate(picked):
        strip.paste(frame.convert("RGB"), (index * (side + gap), 0))
    return strip
