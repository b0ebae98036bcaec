"""How close a reconstruction is to an image record: PSNR and SSIM."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def psnr(reference: np.ndarray, estimate: np.ndarray, *, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)`` (inf if equal)."""
    mse = float(
        np.mean((np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)) ** 2)
    )
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, estimate: np.ndarray, *, data_range: float) -> float:
    """Mean structural similarity of two images ``(channels, height, width)`` (or
    ``(height, width)``), averaged over channels: scikit-image's
    ``structural_similarity`` defaults (7x7 uniform window, or the largest odd window the
    image allows, sample covariance, K1 0.01, K2 0.03, the window-wide border cropped)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(estimate, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    side = min(a.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    if win < 1:
        raise ValueError("images must be at least 1x1")
    return float(np.mean([_ssim_channel(x, y, data_range, win) for x, y in zip(a, b, strict=True)]))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> float:
    n = win**x.ndim
    cov_norm = n / (n - 1) if n > 1 else 1.0
    ux, uy = ndimage.uniform_filter(x, size=win), ndimage.uniform_filter(y, size=win)
    uxx = ndimage.uniform_filter(x * x, size=win)
    uyy = ndimage.uniform_filter(y * y, size=win)
    uxy = ndimage.uniform_filter(x * y, size=win)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    crop = s[tuple(slice(pad, dim - pad) for dim in s.shape)]
    return float(crop.mean())
