"""Raster primitives shared by every synthetic renderer: coordinates, random fields, coverage, finishing.

Images are composed in optical-density (OD) space: stained layers add their
absorbance and the transmitted light is ``exp(-OD)`` (Beer-Lambert).
:func:`finish` turns an OD image into a uint8 RGB picture with stain,
illumination and colour jitter, optical blur and sensor noise.

Fields may be rectangular: coordinates run over [-1, 1] along the longer side
(pixels stay square), so a square canvas gets exactly the [-1, 1] grid.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

F32 = np.float32


def to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density of an RGB transmittance."""
    return -np.log(np.clip(rgb, 1e-3, 1.0))


def coords(n: int, span: int | None = None) -> np.ndarray:
    """1-D pixel-centre coordinates (float64), ``2 / span`` apart and centred on 0.

    With ``span = n`` (the default) they run over [-1, 1].
    """
    span = n if span is None else span
    return (np.arange(n) + 0.5) * (2.0 / span) - n / span


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y down) of a square canvas, float32, read-only."""
    c = coords(size).astype(F32)
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def fourier_field(rng: np.random.Generator, size: int, n: int, freq: float, width: int | None = None) -> np.ndarray:
    """Smooth random field (zero mean, ~unit std): a sum of ``n`` random plane waves.

    The canvas is ``size`` rows by ``width`` (default ``size``) columns, with
    :func:`coords` over the longer side. ``cos(kx*x + ky*y + p)`` is separable,
    so the whole sum is two small matrix products.
    """
    width = size if width is None else width
    span = max(size, width)
    ang = rng.uniform(0.0, 2.0 * np.pi, n)
    k = freq * rng.uniform(0.6, 1.4, n)
    ph = rng.uniform(0.0, 2.0 * np.pi, n)
    ax = coords(width, span)[:, None] * (k * np.cos(ang))[None, :]  # (width, n): phase along x
    by = coords(size, span)[:, None] * (k * np.sin(ang))[None, :] + ph[None, :]  # (size, n): phase along y
    out = np.cos(by) @ np.cos(ax).T - np.sin(by) @ np.sin(ax).T  # rows = y, cols = x
    return (out * math.sqrt(2.0 / n)).astype(F32)


@lru_cache(maxsize=64)
def _noise_gain(sigma_px: float) -> float:
    """1 / std of unit white noise after ``gaussian_filter(sigma_px)`` (exact for the discrete kernel)."""
    delta = np.zeros((1, 8 * math.ceil(sigma_px) + 9))
    delta[0, delta.shape[1] // 2] = 1.0
    k2 = float((ndimage.gaussian_filter(delta, (0.0, sigma_px), mode="constant") ** 2).sum())
    return 1.0 / k2  # 2-D separable: variance is the square of the 1-D sum of squares


def fine_noise(rng: np.random.Generator, size: int, sigma_px: float, width: int | None = None) -> np.ndarray:
    """Band-limited white noise (zero mean, ~unit std) with correlation length ``sigma_px`` pixels."""
    shape = (size, size if width is None else width)
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=F32), sigma_px, mode="wrap")
    f *= F32(_noise_gain(round(sigma_px, 3)))
    return f


def alpha(sdf_px: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    a = sdf_px * F32(1.0 / soft)
    a += F32(0.5)
    np.maximum(a, F32(0.0), out=a)
    np.minimum(a, F32(1.0), out=a)
    return a


def seg_dist(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points to the segment a-b."""
    d = b - a
    L2 = float(d @ d) + 1e-12
    qx = px - F32(a[0])
    qy = py - F32(a[1])
    t = qx * F32(d[0] / L2) + qy * F32(d[1] / L2)
    np.maximum(t, F32(0.0), out=t)
    np.minimum(t, F32(1.0), out=t)
    return np.hypot(qx - t * F32(d[0]), qy - t * F32(d[1]))


def splat(size: int, cols: np.ndarray, rows: np.ndarray, weights: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian dots at sub-pixel positions on a square canvas; a lone dot peaks at about its weight."""
    c0 = np.floor(cols).astype(np.int64)
    r0 = np.floor(rows).astype(np.int64)
    fc = cols - c0
    fr = rows - r0
    acc = np.zeros(size * size, dtype=np.float64)
    corners = ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc))
    for dr, dc, w in corners:
        rr = r0 + dr
        cc = c0 + dc
        ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        acc += np.bincount((rr[ok] * size + cc[ok]), weights=(w * weights)[ok], minlength=size * size)
    field = ndimage.gaussian_filter(acc.reshape(size, size).astype(F32), sigma_px, mode="constant")
    return field * F32(2.0 * np.pi * sigma_px**2)


def color_matrix(rng: np.random.Generator, hue_sd: float, sat_sd: float) -> np.ndarray:
    """3x3 RGB matrix: rotation about the grey axis (hue) and scaling away from it (saturation)."""
    theta = rng.normal(0.0, hue_sd)
    c, s = math.cos(theta), math.sin(theta)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    # Rodrigues rotation about (1,1,1)/sqrt(3)
    hue = np.array(
        [
            [c + k * (1 - c), k * (1 - c) - sq * s, k * (1 - c) + sq * s],
            [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
            [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
        ]
    )
    sat = min(1.5, max(0.4, math.exp(rng.normal(0.0, sat_sd))))
    grey = np.full((3, 3), 1.0 / 3.0)
    return (grey + sat * (np.eye(3) - grey)) @ hue


def finish(od_img: np.ndarray, rng: np.random.Generator, d: float, blur_scale: float) -> np.ndarray:
    """Stain/illumination/colour jitter, blur and noise: optical density (H,W,3) -> uint8 RGB.

    All of it is drawn independently of what is in the image, so it is nuisance
    shared by all classes. ``d`` is the difficulty in [0, 1]; ``blur_scale``
    stretches the blur radius (1 for a 64-pixel WBC crop, ``size / 64`` for
    larger crops). ``od_img`` is modified in place.
    """
    h, w = od_img.shape[:2]
    span = max(h, w)
    # stain strength and per-channel stain hue
    od_img *= (math.exp(rng.normal(0.0, 0.06 + 0.2 * d)) * np.exp(rng.normal(0.0, 0.02 + 0.07 * d, 3))).astype(F32)
    img = np.exp(-od_img)
    # illumination gradient (a plane, written as an outer sum)
    g = rng.uniform(0.0, 0.04 + 0.14 * d)
    a = rng.uniform(0.0, 2.0 * np.pi)
    illum = (1.0 - g) + g * (math.sin(a) * coords(h, span)[:, None] + math.cos(a) * coords(w, span)[None, :])
    img *= illum.astype(F32)[..., None]
    # colour jitter: hue rotation, saturation, brightness, contrast
    m = color_matrix(rng, 0.04 + 0.36 * d, 0.06 + 0.3 * d)
    m *= math.exp(rng.normal(0.0, 0.03 + 0.07 * d))
    img = img @ m.T.astype(F32)
    contrast = math.exp(rng.normal(0.0, 0.04 + 0.12 * d))
    mean = float(img.mean())
    img -= F32(mean)
    img *= F32(contrast)
    img += F32(mean)
    # optical blur
    sigma = rng.uniform(0.0, 0.3 + 1.2 * d) * blur_scale
    if sigma > 0.15:
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0.0), mode="nearest")
    # sensor noise
    img += rng.standard_normal(img.shape, dtype=F32) * F32(0.004 + 0.03 * d)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)
