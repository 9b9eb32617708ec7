"""The speedup-vs-PSNR scatter plot `ditserve bench cache` writes next to its JSON, drawn with PIL only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Plot: one colour per peer and method, one marker shape per peer.
SERIES_COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (255, 187, 120),
]


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [t * step for t in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _marker(draw: ImageDraw.ImageDraw, peer: str, x: float, y: float, color: tuple[int, int, int]) -> None:
    r = 5
    if peer == "ours":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(0, 0, 0))
    elif peer == "cache-dit":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color, outline=(0, 0, 0))
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=color, outline=(0, 0, 0))


def plot(
    results: list[dict[str, Any]], path: Path, title: str, psnr_floor_db: float, speedup_target: float
) -> Path | None:
    """Speedup against PSNR for the cached rows that ran, with the summary rule's PSNR floor and speedup target."""
    points = [r for r in results if "error" not in r and r.get("psnr_db") is not None]
    if not points:
        return None
    width, height, left, right, top, bottom = 960, 640, 80, 300, 50, 70
    x_low = min(psnr_floor_db - 5, min(r["psnr_db"] for r in points)) - 1
    x_high = max(psnr_floor_db + 5, max(r["psnr_db"] for r in points)) + 1
    y_high = max(speedup_target, max(r["speedup"] for r in points)) * 1.1
    y_low = min(0.9, min(r["speedup"] for r in points) * 0.95)

    def at(psnr_db: float, speedup: float) -> tuple[float, float]:
        x = left + (psnr_db - x_low) / (x_high - x_low) * (width - left - right)
        y = height - bottom - (speedup - y_low) / (y_high - y_low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    plot_right, plot_bottom = width - right, height - bottom
    for value in _ticks(x_low, x_high):
        x, _ = at(value, y_low)
        draw.line((x, top, x, plot_bottom), fill=(235, 235, 235))
        draw.text((x, plot_bottom + 6), f"{value:g}", fill="black", font=font, anchor="mt")
    for value in _ticks(y_low, y_high):
        _, y = at(x_low, value)
        draw.line((left, y, plot_right, y), fill=(235, 235, 235))
        draw.text((left - 6, y), f"{value:g}", fill="black", font=font, anchor="rm")
    x30, y2 = at(psnr_floor_db, speedup_target)
    draw.line((x30, top, x30, plot_bottom), fill=(200, 60, 60), width=1)
    draw.line((left, y2, plot_right, y2), fill=(200, 60, 60), width=1)
    draw.rectangle((left, top, plot_right, plot_bottom), outline="black")
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mm")
    draw.text(((left + plot_right) / 2, height - 25), "PSNR vs uncached (dB)", fill="black", font=font, anchor="mm")
    draw.text((15, top - 12), "speedup vs uncached (same harness)", fill="black", font=font, anchor="lm")
    series = sorted({(r["peer"], r["method"]) for r in points}, key=lambda s: (s[0] != "ours", s))
    colors = {key: SERIES_COLORS[index % len(SERIES_COLORS)] for index, key in enumerate(series)}
    for r in points:
        _marker(draw, r["peer"], *at(r["psnr_db"], r["speedup"]), colors[(r["peer"], r["method"])])
    for index, key in enumerate(series):
        y = top + 10 + index * 22
        _marker(draw, key[0], plot_right + 25, y, colors[key])
        draw.text((plot_right + 40, y), f"{key[0]} {key[1]}", fill="black", font=font, anchor="lm")
    image.save(path)
    return path
