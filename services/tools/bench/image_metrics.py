"""Image quality against a reference image: PSNR and SSIM on uint8 RGB arrays, in numpy (no torch).

A clip [frames, height, width, 3] is its frames: its PSNR is over all of their pixels, its SSIM the mean
of theirs.
"""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP_DB = 100.0  # identical images: a finite number keeps the JSON strict and means stay defined


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255**2 / mse))


def _gaussian_blur_valid(values: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filter over the first two axes, keeping only full windows ('valid')."""
    size = len(taps)
    rows = sum(weight * values[k : values.shape[0] - size + 1 + k] for k, weight in enumerate(taps))
    return sum(weight * rows[:, k : rows.shape[1] - size + 1 + k] for k, weight in enumerate(taps))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, range 255; the mean
    of the SSIM map over the window positions inside the image, per channel, then over channels."""
    if image.ndim == 4:  # a clip
        return float(np.mean([ssim(frame, ref) for frame, ref in zip(image, reference, strict=True)]))
    if min(image.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {image.shape[:2]}")
    offsets = np.arange(11) - 5
    taps = np.exp(-(offsets**2) / (2 * 1.5**2))
    taps /= taps.sum()
    x, y = image.astype(np.float64), reference.astype(np.float64)
    mu_x, mu_y = _gaussian_blur_valid(x, taps), _gaussian_blur_valid(y, taps)
    var_x = _gaussian_blur_valid(x * x, taps) - mu_x**2
    var_y = _gaussian_blur_valid(y * y, taps) - mu_y**2
    covariance = _gaussian_blur_valid(x * y, taps) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())
