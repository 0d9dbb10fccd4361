"""Procedural, deterministic synthetic white-blood-cell (WBC) images.

No real data can be downloaded, so this module is the default data source for
the demo and the tests. It draws Wright-Giemsa-like blood-smear crops with a
centred WBC whose class is carried by the morphology a hematologist would name:

* **lymphocyte** - small cell, round dense dark-purple nucleus filling most of
  it, thin sky-blue cytoplasm rim, no granules;
* **monocyte** - large cell, folded / kidney / horseshoe nucleus with lighter
  lacy chromatin, grey-blue cytoplasm with a few clear vacuoles;
* **neutrophil** - medium-large cell, 3-5 nuclear lobes joined by thin strands,
  pale lilac cytoplasm with fine faint granules;
* **eosinophil** - medium-large cell, bilobed ("spectacles") nucleus, cytoplasm
  packed with coarse orange-red granules;
* **basophil** - medium cell, nucleus mostly hidden under many dark
  purple-black granules.

Images are composed in optical-density space (Beer-Lambert: stained layers
add their absorbance and the transmitted light is ``exp(-OD)``), on a pale
smear background with red blood cells. Every image gets its own nuisance
variation (stain strength and hue, saturation, brightness, size, rotation,
elongation, blur, noise, illumination gradient, RBC clutter) whose spread grows
with ``difficulty`` in [0, 1]; higher difficulty also pulls the classes
towards each other (overlapping sizes, merging lobes, sparser / fainter
granules, class colours mixed towards a common one, lower nuclear contrast).

Everything is deterministic: a given :class:`numpy.random.Generator` state
gives the same image, and the dataset writers derive each image's generator
from ``(seed, class index, image index)`` so that asking for more images never
changes the first ones.

Public API: :data:`WBC_CLASSES`, :func:`render_cell`, :func:`make_wbc_dataset`,
:func:`render_tissue_patch`, :func:`make_pool`.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from scipy import ndimage

from leukolab.errors import LeukolabError

__all__ = [
    "WBC_CLASSES",
    "make_pool",
    "make_wbc_dataset",
    "render_cell",
    "render_tissue_patch",
]

WBC_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
"""The five WBC classes, in the (alphabetical, ImageFolder) order used for class indices."""

_POOL_STREAM = 1000  # second entropy word of pool images; WBC datasets use the class index 0..4

_T = TypeVar("_T")
_F = np.float32

# ----------------------------------------------------------------------------------------------
# Colours (RGB in [0, 1], the *appearance* of a region over what lies beneath it)
# ----------------------------------------------------------------------------------------------

_BG = np.array([0.93, 0.87, 0.85])  # pale pink/beige plasma
_RBC = np.array([0.88, 0.62, 0.62])  # red-cell rim
_RBC_PALLOR = np.array([0.94, 0.84, 0.83])  # paler centre

# per class: cytoplasm, nucleus, granule (None = no granules)
_STYLE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {
    "lymphocyte": (np.array([0.64, 0.76, 0.92]), np.array([0.27, 0.15, 0.43]), None),
    "monocyte": (np.array([0.70, 0.72, 0.82]), np.array([0.52, 0.40, 0.64]), None),
    "neutrophil": (np.array([0.87, 0.77, 0.85]), np.array([0.38, 0.22, 0.52]), np.array([0.72, 0.56, 0.74])),
    "eosinophil": (np.array([0.92, 0.77, 0.72]), np.array([0.40, 0.25, 0.53]), np.array([0.90, 0.47, 0.34])),
    "basophil": (np.array([0.76, 0.66, 0.82]), np.array([0.42, 0.28, 0.58]), np.array([0.17, 0.07, 0.26])),
}
_COMMON_CYTO = np.array([0.78, 0.74, 0.84])  # what class cytoplasm colours drift to at high difficulty
_VACUOLE = np.array([0.93, 0.91, 0.94])

# cell radius (fraction of the half-crop, i.e. diameter as a fraction of the crop): mean, spread
_RADIUS: dict[str, tuple[float, float]] = {
    "lymphocyte": (0.52, 0.04),
    "basophil": (0.62, 0.04),
    "neutrophil": (0.70, 0.045),
    "eosinophil": (0.72, 0.045),
    "monocyte": (0.81, 0.045),
}
_COMMON_RADIUS = 0.67

# chromatin texture per class: contrast, correlation length (pixels at 64 px)
_CHROMATIN: dict[str, tuple[float, float]] = {
    "lymphocyte": (0.22, 1.1),
    "monocyte": (0.4, 0.8),
    "neutrophil": (0.2, 1.1),
    "eosinophil": (0.22, 1.1),
    "basophil": (0.2, 1.1),
}
# granules per class: count (for a cell of radius 0.7, at any pixel size), dot sigma (px at 64 px), weight,
# visibility over the nucleus (0: cytoplasm only, 1: everywhere)
_GRANULES: dict[str, tuple[int, float, float, float]] = {
    "neutrophil": (260, 0.55, 0.35, 0.3),
    "eosinophil": (230, 0.8, 1.0, 0.3),
    "basophil": (55, 0.95, 1.0, 1.0),
}


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density of an RGB transmittance."""
    return -np.log(np.clip(rgb, 1e-3, 1.0))


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 16:
        raise LeukolabError(f"size must be an integer >= 16 pixels, got {size!r}")
    return int(size)


def _check_fraction(name: str, value: object) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise LeukolabError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise LeukolabError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise LeukolabError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_label(label: object) -> str:
    if label not in WBC_CLASSES:
        raise LeukolabError(f"unknown WBC class {label!r}; expected one of {', '.join(WBC_CLASSES)}")
    return str(label)


def _check_out(out: Path | str) -> Path:
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise LeukolabError(f"output path {str(out)!r} exists and is not a folder; refusing to overwrite")
        if any(out.iterdir()):
            raise LeukolabError(f"output folder {str(out)!r} exists and is not empty; not overwriting it")
    return out


# ----------------------------------------------------------------------------------------------
# Small rendering helpers
# ----------------------------------------------------------------------------------------------


def _coords(size: int) -> np.ndarray:
    """1-D pixel-centre coordinates in [-1, 1] (float64)."""
    return (np.arange(size) + 0.5) * (2.0 / size) - 1.0


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y down), float32, read-only."""
    c = _coords(size).astype(_F)
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _fourier_field(rng: np.random.Generator, size: int, n: int, freq: float) -> np.ndarray:
    """Smooth random field on the [-1, 1] grid (zero mean, ~unit std): a sum of ``n`` random plane waves.

    ``cos(kx*x + ky*y + p)`` is separable, so the whole sum is two small matrix products.
    """
    ang = rng.uniform(0.0, 2.0 * np.pi, n)
    k = freq * rng.uniform(0.6, 1.4, n)
    ph = rng.uniform(0.0, 2.0 * np.pi, n)
    c = _coords(size)[:, None]
    ax = c * (k * np.cos(ang))[None, :]  # (size, n): phase along x
    by = c * (k * np.sin(ang))[None, :] + ph[None, :]  # (size, n): phase along y
    out = np.cos(by) @ np.cos(ax).T - np.sin(by) @ np.sin(ax).T  # rows = y, cols = x
    return (out * math.sqrt(2.0 / n)).astype(_F)


@lru_cache(maxsize=64)
def _noise_gain(sigma_px: float) -> float:
    """1 / std of unit white noise after ``gaussian_filter(sigma_px)`` (exact for the discrete kernel)."""
    delta = np.zeros((1, 8 * math.ceil(sigma_px) + 9))
    delta[0, delta.shape[1] // 2] = 1.0
    k2 = float((ndimage.gaussian_filter(delta, (0.0, sigma_px), mode="constant") ** 2).sum())
    return 1.0 / k2  # 2-D separable: variance is the square of the 1-D sum of squares


def _fine_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Band-limited white noise (zero mean, ~unit std) with correlation length ``sigma_px`` pixels."""
    f = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=_F), sigma_px, mode="wrap")
    f *= _F(_noise_gain(round(sigma_px, 3)))
    return f


def _alpha(sdf_px: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    a = sdf_px * _F(1.0 / soft)
    a += _F(0.5)
    np.maximum(a, _F(0.0), out=a)
    np.minimum(a, _F(1.0), out=a)
    return a


def _seg_dist(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points to the segment a-b."""
    d = b - a
    L2 = float(d @ d) + 1e-12
    qx = px - _F(a[0])
    qy = py - _F(a[1])
    t = qx * _F(d[0] / L2) + qy * _F(d[1] / L2)
    np.maximum(t, _F(0.0), out=t)
    np.minimum(t, _F(1.0), out=t)
    return np.hypot(qx - t * _F(d[0]), qy - t * _F(d[1]))


def _splat(size: int, cols: np.ndarray, rows: np.ndarray, weights: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian dots at sub-pixel positions; a lone dot peaks at about its weight."""
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
    field = ndimage.gaussian_filter(acc.reshape(size, size).astype(_F), sigma_px, mode="constant")
    return field * _F(2.0 * np.pi * sigma_px**2)


def _color_matrix(rng: np.random.Generator, hue_sd: float, sat_sd: float) -> np.ndarray:
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


def _finish(od: np.ndarray, rng: np.random.Generator, d: float, size: int) -> np.ndarray:
    """Stain/illumination/colour jitter, blur and noise: optical density (H,W,3) -> uint8 RGB.

    All of it is drawn independently of the class, so it is nuisance shared by all classes.
    """
    scale = size / 64.0
    # stain strength and per-channel stain hue
    od *= (math.exp(rng.normal(0.0, 0.06 + 0.2 * d)) * np.exp(rng.normal(0.0, 0.02 + 0.07 * d, 3))).astype(_F)
    img = np.exp(-od)
    # illumination gradient (a plane, written as an outer sum)
    g = rng.uniform(0.0, 0.04 + 0.14 * d)
    a = rng.uniform(0.0, 2.0 * np.pi)
    c = _coords(size)
    illum = (1.0 - g) + g * (math.sin(a) * c[:, None] + math.cos(a) * c[None, :])
    img *= illum.astype(_F)[..., None]
    # colour jitter: hue rotation, saturation, brightness, contrast
    m = _color_matrix(rng, 0.04 + 0.36 * d, 0.06 + 0.3 * d)
    m *= math.exp(rng.normal(0.0, 0.03 + 0.07 * d))
    img = img @ m.T.astype(_F)
    contrast = math.exp(rng.normal(0.0, 0.04 + 0.12 * d))
    mean = float(img.mean())
    img -= _F(mean)
    img *= _F(contrast)
    img += _F(mean)
    # optical blur
    sigma = rng.uniform(0.0, 0.3 + 1.2 * d) * scale
    if sigma > 0.15:
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0.0), mode="nearest")
    # sensor noise
    img += rng.standard_normal(img.shape, dtype=_F) * _F(0.004 + 0.03 * d)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# WBC rendering
# ----------------------------------------------------------------------------------------------


def _lobes_sdf(
    lx: np.ndarray,
    ly: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    strand: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Union of lobes joined in sequence by thin capsules (strands); units of the cell radius.

    Lobes are discs, or with ``rng`` short capsules (slightly elongated, randomly oriented).
    """
    sdf = np.full(lx.shape, -10.0, dtype=_F)
    for (cx, cy), r in zip(centres.tolist(), radii.tolist(), strict=True):
        if rng is None:
            np.maximum(sdf, r - np.hypot(lx - _F(cx), ly - _F(cy)), out=sdf)
        else:
            half = r * rng.uniform(0.0, 0.45)
            a = rng.uniform(0.0, np.pi)
            off = half * np.array([math.cos(a), math.sin(a)])
            r_cap = r - 0.3 * half  # keep the area about the same
            c = np.array([cx, cy])
            np.maximum(sdf, r_cap - _seg_dist(lx, ly, c - off, c + off), out=sdf)
    for i in range(len(centres) - 1):
        np.maximum(sdf, strand - _seg_dist(lx, ly, centres[i], centres[i + 1]), out=sdf)
    return sdf


def _chain(rng: np.random.Generator, radii: np.ndarray, gap: tuple[float, float], turn: float) -> np.ndarray:
    """Centres of lobes of the given radii along a curved random chain, centred on the origin.

    Consecutive centres are ``(r_i + r_{i+1}) * U(gap)`` apart (gap < 1: lobes overlap / merge).
    """
    n = len(radii)
    pts = np.zeros((n, 2))
    ang = rng.uniform(0.0, 2.0 * np.pi)
    for i in range(1, n):
        step = (radii[i - 1] + radii[i]) * rng.uniform(*gap)
        pts[i] = pts[i - 1] + step * np.array([math.cos(ang), math.sin(ang)])
        ang += rng.uniform(-turn, turn)
    return pts - pts.mean(axis=0)


def _fit_inside(centres: np.ndarray, radii: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a lobe arrangement so that it fits in a disc of radius ``limit``."""
    ext = float(np.max(np.hypot(centres[:, 0], centres[:, 1]) + radii))
    if ext > limit:
        f = limit / ext
        return centres * f, radii * f
    return centres, radii


def _nucleus(label: str, lx: np.ndarray, ly: np.ndarray, rng: np.random.Generator, d: float) -> np.ndarray:
    """Signed distance (units of the cell radius, positive inside) of the nucleus of a ``label`` cell."""
    if label == "lymphocyte":
        # round dense nucleus filling most of the cell, a little eccentric; larger rim at high difficulty
        r = rng.uniform(0.76 - 0.2 * d, 0.87)
        off = rng.uniform(0.0, 0.9) * (0.95 - r)
        a = rng.uniform(0.0, 2.0 * np.pi)
        cx, cy = off * math.cos(a), off * math.sin(a)
        sdf = r - np.hypot(lx - _F(cx), ly - _F(cy))
        if rng.random() < 0.3:  # slight indentation
            b = rng.uniform(0.0, 2.0 * np.pi)
            nr = rng.uniform(0.15, 0.3) * r
            nx, ny = cx + (r + 0.6 * nr) * math.cos(b), cy + (r + 0.6 * nr) * math.sin(b)
            np.minimum(sdf, np.hypot(lx - _F(nx), ly - _F(ny)) - _F(nr), out=sdf)
        return sdf
    if label == "monocyte":
        # thick arc: kidney (short span) ... horseshoe (long span); sometimes folded over
        span = rng.uniform(1.3, 3.6) if rng.random() >= 0.3 * d else rng.uniform(0.3, 1.3)  # barely indented
        ra = rng.uniform(0.3, 0.42)
        w = rng.uniform(0.21, 0.3) + 0.05 * (3.6 - span) / 2.3
        # put the arc's centroid near the cell centre, with a little eccentricity
        shift = ra * math.sin(span / 2) / (span / 2) + rng.uniform(-0.08, 0.08)
        ux = lx + _F(shift)
        uy = ly + _F(rng.uniform(-0.08, 0.08))
        phi_c = np.clip(np.arctan2(uy, ux), -span / 2, span / 2)
        sdf = w - np.hypot(ux - ra * np.cos(phi_c), uy - ra * np.sin(phi_c))
        if rng.random() < 0.35:  # fold: an extra lobe near the hilum
            b = rng.uniform(-span / 2, span / 2)
            fr = rng.uniform(0.14, 0.22)
            np.maximum(sdf, fr - np.hypot(ux - 0.5 * ra * math.cos(b), uy - 0.5 * ra * math.sin(b)), out=sdf)
        return sdf
    if label == "neutrophil":
        n = int(rng.choice([3, 4, 5], p=[0.45, 0.4, 0.15]))
        if rng.random() < 0.4 * d:
            n = 2  # at high difficulty some look bilobed
        r = rng.uniform(0.27, 0.34, n)
        merge = 0.4 * d * rng.random()  # lobes closer together at high difficulty
        centres = _chain(rng, r, (0.9 - merge, 1.12 - merge), 1.6)
        centres, r = _fit_inside(centres, r, 0.86)
        strand = rng.uniform(0.03, 0.05) + 0.05 * d * rng.random()
        return _lobes_sdf(lx, ly, centres, r, strand, rng)
    if label == "eosinophil":
        n = 3 if rng.random() < 0.25 * d else 2
        r = rng.uniform(0.3, 0.36, n)
        merge = 0.3 * d * rng.random()
        centres = _chain(rng, r, (1.0 - merge, 1.2 - merge), 1.0)
        centres, r = _fit_inside(centres, r, 0.84)
        strand = rng.uniform(0.04, 0.06) + 0.05 * d * rng.random()
        return _lobes_sdf(lx, ly, centres, r, strand)
    # basophil: irregular, often bilobed, largely hidden by granules
    n = int(rng.choice([1, 2], p=[0.4, 0.6]))
    r = rng.uniform(0.34, 0.45, n)
    centres = _chain(rng, r, (0.5, 0.8), 1.0)
    centres, r = _fit_inside(centres, r, 0.8)
    return _lobes_sdf(lx, ly, centres, r, 0.12)


@lru_cache(maxsize=4096)
def _rbc_sprite(r_px: float, e: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and central-pallor weight of one red cell centred on a pixel centre (cached)."""
    h = math.ceil(r_px * (1.0 + e) + 2)
    c = np.arange(-h, h + 1, dtype=np.float64)
    xs, ys = np.meshgrid(c, c)
    ct, st = math.cos(t), math.sin(t)
    u = (xs * ct + ys * st) * (1.0 - e / 2)
    v = (ys * ct - xs * st) * (1.0 + e / 2)
    rho = np.hypot(u, v) / r_px
    a = _alpha((1.0 - rho) * r_px, 1.2)
    pal = a * np.exp(-((rho / 0.62) ** 4))
    a.setflags(write=False)
    pal.setflags(write=False)
    return a.astype(_F), pal.astype(_F)


def _add_rbcs(
    od: np.ndarray,
    rng: np.random.Generator,
    d: float,
    zoom: float,
    cell: tuple[float, float, float],
) -> None:
    """Add red blood cells (pink discs with central pallor) to the optical density ``od`` in place."""
    size = od.shape[0]
    px = 2.0 / size
    ccx, ccy, crad = cell
    n = 2 + int(rng.poisson(2.0 + 5.0 * d))
    amount = np.zeros((size, size), dtype=_F)
    pallor = np.zeros((size, size), dtype=_F)
    overlap = 0.12 + 0.5 * d  # how deeply an RBC may tuck under the WBC (fraction of the sum of radii)
    placed = 0
    for _ in range(4 * n):
        if placed >= n:
            break
        r = 0.34 * zoom * rng.uniform(0.88, 1.12)
        cx, cy = rng.uniform(-1.25, 1.25, 2)
        if math.hypot(cx - ccx, cy - ccy) < (crad + r) * (1.0 - overlap):
            continue
        placed += 1
        e, t, strength, pal_strength = rng.random(4)
        # quantised shape so that sprites can be cached: radius to 1/4 px, 4 elongations, 6 angles
        a, pal = _rbc_sprite(round(r / px * 4) / 4, round(e * 3) * 0.05, round(t * 6) * np.pi / 6)
        h = a.shape[0] // 2
        ci, ri = int((cx + 1.0) / px), int((cy + 1.0) / px)  # pixel holding the centre
        c0, c1, r0, r1 = max(0, ci - h), min(size, ci + h + 1), max(0, ri - h), min(size, ri + h + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        win = (slice(r0 - ri + h, r1 - ri + h), slice(c0 - ci + h, c1 - ci + h))
        amount[r0:r1, c0:c1] += a[win] * _F(0.85 + 0.3 * strength)
        pallor[r0:r1, c0:c1] += pal[win] * _F((0.85 + 0.3 * strength) * (0.6 + 0.4 * pal_strength))
    od += amount[..., None] * _od(_RBC).astype(_F)
    od += pallor[..., None] * (_od(_RBC_PALLOR) - _od(_RBC)).astype(_F)


def render_cell(
    label: str, size: int, rng: np.random.Generator, difficulty: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic blood-smear crop with a centred white blood cell.

    Args:
        label: WBC class, one of :data:`WBC_CLASSES`.
        size: side of the square crop in pixels (>= 16).
        rng: the random generator that decides everything about the image; the
            same generator state gives the same image.
        difficulty: 0 (easy, little nuisance variation, well separated classes)
            to 1 (hard: strong stain/size/blur/noise/clutter variation, classes
            overlap). See the module docstring.

    Returns:
        ``(image, mask)``: an ``(size, size, 3)`` uint8 RGB image and an
        ``(size, size)`` bool mask of the white blood cell (cytoplasm and
        nucleus).

    Raises:
        LeukolabError: unknown ``label``, ``size`` < 16 or ``difficulty``
            outside [0, 1].
    """
    label = _check_label(label)
    size = _check_size(size)
    d = _check_fraction("difficulty", difficulty)
    x, y = _grid(size)
    px = 2.0 / size
    scale = size / 64.0

    zoom = rng.uniform(1.0 - 0.2 * d, 1.04)  # magnification: smaller cells at high difficulty
    cyto_rgb, nuc_rgb, gran_rgb = _STYLE[label]

    # --- geometry of the WBC: jittered centre, radius, rotation, elongation, wobbly outline ----
    mean_r, sd_r = _RADIUS[label]
    mean_r = _COMMON_RADIUS + (mean_r - _COMMON_RADIUS) * (1.0 - 0.5 * d)
    R = min(0.95, zoom * mean_r * math.exp(rng.normal(0.0, sd_r / mean_r * (1.0 + 1.5 * d))))
    jit = 0.03 + 0.07 * d
    ccx, ccy = (float(v) for v in np.clip(rng.normal(0.0, jit, 2), -0.15, 0.15))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    elong = rng.uniform(0.0, 0.08 + 0.22 * d)
    sa, sb = R * math.sqrt(1.0 + elong), R / math.sqrt(1.0 + elong)
    ct, st = math.cos(theta), math.sin(theta)
    dx, dy = x - _F(ccx), y - _F(ccy)
    lx = dx * _F(ct / sa) + dy * _F(st / sa)  # local frame, in units of the cell radius
    ly = dy * _F(ct / sb) - dx * _F(st / sb)
    rho = np.hypot(lx, ly)
    wob = _fourier_field(rng, size, 3, 3.0 / R) * _F(0.025)
    to_px = min(sa, sb) / px
    cell_a = _alpha((1.0 + wob - rho) * _F(to_px), 1.3)

    # --- background and red cells (behind the WBC) -----------------------------------------------
    od = np.empty((size, size, 3), dtype=_F)
    od[:] = _od(_BG).astype(_F)
    od *= (1.0 + (0.08 + 0.15 * d) * _fourier_field(rng, size, 3, 2.5))[..., None]
    _add_rbcs(od, rng, d, zoom, (ccx, ccy, R))
    od *= (1.0 - 0.8 * cell_a)[..., None]

    # --- colours (drift towards a common cytoplasm colour at high difficulty) --------------------
    mix = rng.uniform(0.0, 0.8 * d)
    cyto_rgb = cyto_rgb + (_COMMON_CYTO - cyto_rgb) * mix
    cyto_rgb = np.clip(cyto_rgb * np.exp(rng.normal(0.0, 0.02 + 0.04 * d, 3)), 0.05, 1.0)
    cyto_od = (_od(cyto_rgb) - 0.2 * _od(_BG)).astype(_F)
    nuc_contrast = rng.uniform(1.0 - 0.3 * d, 1.05)
    nuc_od = ((_od(nuc_rgb) - _od(cyto_rgb)) * nuc_contrast).astype(_F)

    cyto_tex = _fine_noise(rng, size, 1.5 * scale)
    cyto_tex *= _F(0.08 + 0.04 * d)
    cyto_tex += 1.0
    cyto_tex *= cell_a
    od += cyto_tex[..., None] * cyto_od

    # --- nucleus with chromatin texture ----------------------------------------------------------
    nuc_sdf = _nucleus(label, lx, ly, rng, d)
    nuc_sdf += _fourier_field(rng, size, 4, 5.0 / R) * _F(0.03)  # irregular outline
    nuc_a = _alpha(nuc_sdf * _F(to_px), 1.2) * cell_a
    chrom_sd, chrom_px = _CHROMATIN[label]
    chrom = np.clip(1.0 + chrom_sd * _fine_noise(rng, size, chrom_px * scale), 0.2, 2.0)
    od += (nuc_a * chrom)[..., None] * nuc_od

    # --- cytoplasmic features -----------------------------------------------------------------
    if label == "monocyte":  # a few clear vacuoles
        vac = np.zeros_like(rho)
        for _ in range(int(rng.integers(1, 6))):
            vr = rng.uniform(0.05, 0.1)
            a = rng.uniform(0.0, 2.0 * np.pi)
            dist = rng.uniform(0.55, 0.85)
            vx, vy = _F(dist * math.cos(a)), _F(dist * math.sin(a))
            np.maximum(vac, _alpha((_F(vr) - np.hypot(lx - vx, ly - vy)) * _F(to_px)), out=vac)
        vac *= cell_a * (1.0 - nuc_a) * _F(rng.uniform(0.6, 0.9))
        od += vac[..., None] * (_od(_VACUOLE) - _od(cyto_rgb)).astype(_F)

    if gran_rgb is not None:
        n_gran, g_sigma, g_w, over_nuc = _GRANULES[label]
        density = 1.0 - 0.7 * d * rng.random()  # sparser ...
        strength = 1.0 - 0.7 * d * rng.random()  # ... and fainter at high difficulty
        n = round(n_gran * density * R * R / 0.49)  # a physical count: independent of the pixel size
        rr = 0.94 * np.sqrt(rng.random(n))
        aa = rng.uniform(0.0, 2.0 * np.pi, n)
        gu, gv = rr * np.cos(aa) * sa, rr * np.sin(aa) * sb
        gx = ccx + gu * ct - gv * st
        gy = ccy + gu * st + gv * ct
        w = rng.uniform(0.6, 1.0, n) * g_w * strength
        gran = _splat(size, (gx + 1.0) / px - 0.5, (gy + 1.0) / px - 0.5, w, g_sigma * scale)
        np.clip(gran, 0.0, 1.0, out=gran)
        gran *= cell_a * (1.0 - (1.0 - over_nuc) * nuc_a)
        under = _od(cyto_rgb) if over_nuc < 1.0 else 0.4 * _od(cyto_rgb) + 0.6 * _od(nuc_rgb)
        od += gran[..., None] * (_od(gran_rgb) - under).astype(_F)

    img = _finish(od, rng, d, size)
    return img, cell_a >= 0.5


# ----------------------------------------------------------------------------------------------
# Tissue patches (off-domain pool images)
# ----------------------------------------------------------------------------------------------

_EOSIN = np.array([0.92, 0.62, 0.76])
_HEMA_NUC = np.array([0.34, 0.22, 0.52])
_EPITH = np.array([0.84, 0.58, 0.78])


def _blob(
    acc: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    px: float,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    weight: float,
) -> None:
    """Max-composite an anti-aliased ellipse of value ``weight`` into ``acc`` (in place, bbox only)."""
    size = acc.shape[0]
    cx, cy = centre
    ext = max(radii) + 2 * px
    c0 = max(0, int((cx - ext + 1.0) / px))
    c1 = min(size, int((cx + ext + 1.0) / px) + 2)
    r0 = max(0, int((cy - ext + 1.0) / px))
    r1 = min(size, int((cy + ext + 1.0) / px) + 2)
    if c0 >= c1 or r0 >= r1:
        return
    xs = x[r0:r1, c0:c1] - cx
    ys = y[r0:r1, c0:c1] - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (xs * c + ys * s) / radii[0]
    v = (-xs * s + ys * c) / radii[1]
    sdf = (1.0 - np.hypot(u, v)) * min(radii) / px
    a = _alpha(sdf, 1.2) * weight
    np.maximum(acc[r0:r1, c0:c1], a, out=acc[r0:r1, c0:c1])


def render_tissue_patch(size: int, rng: np.random.Generator) -> np.ndarray:
    """Render an off-domain H&E-like tissue patch (a stand-in for pRCC / Camelyon16 crops).

    Pink fibrous stroma, clusters of purple nuclei, scattered spindle nuclei and
    sometimes glands (a white lumen lined by epithelial cells and their nuclei).
    There is no cell of interest and hence no mask.

    Args:
        size: side of the square patch in pixels (>= 16).
        rng: the random generator that decides everything about the patch.

    Returns:
        An ``(size, size, 3)`` uint8 RGB image.

    Raises:
        LeukolabError: ``size`` < 16.
    """
    size = _check_size(size)
    x, y = _grid(size)
    px = 2.0 / size
    zoom = rng.uniform(0.7, 1.3)

    # stroma: wavy eosin fibres
    fib_ang = rng.uniform(0.0, np.pi)
    warp = _fourier_field(rng, size, 3, 2.0)
    along = -x * math.sin(fib_ang) + y * math.cos(fib_ang)
    fibres = np.sin(along * rng.uniform(14.0, 26.0) / zoom + 2.0 * warp)
    stroma = 0.75 + 0.18 * fibres + 0.12 * _fine_noise(rng, size, 0.8 * size / 64)
    stroma *= 1.0 + 0.2 * _fourier_field(rng, size, 3, 3.0)
    eosin_w = np.clip(stroma, 0.0, 2.0)

    nuclei = np.zeros_like(x)
    epith = np.zeros_like(x)
    lumen = np.zeros_like(x)
    # glands: lumen + ring of epithelial cells with basal nuclei
    for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))):
        gx, gy = rng.uniform(-0.8, 0.8, 2)
        lr = rng.uniform(0.15, 0.35) * zoom
        le = rng.uniform(0.7, 1.0)
        ga = rng.uniform(0.0, np.pi)
        band = rng.uniform(0.12, 0.2) * zoom
        _blob(epith, x, y, px, (gx, gy), (lr + band, (lr + band) * le), ga, 1.0)
        _blob(lumen, x, y, px, (gx, gy), (lr, lr * le), ga, 1.0)
        n_ring = max(6, int(2 * np.pi * (lr + band / 2) / (0.11 * zoom)))
        for k in range(n_ring):
            t = 2 * np.pi * k / n_ring + rng.normal(0.0, 0.05)
            rr = lr + band * rng.uniform(0.5, 0.75)
            ex, ey = rr * math.cos(t), rr * le * math.sin(t)
            c, s = math.cos(ga), math.sin(ga)
            cx, cy = gx + ex * c - ey * s, gy + ex * s + ey * c
            nr = rng.uniform(0.035, 0.05) * zoom
            _blob(nuclei, x, y, px, (cx, cy), (nr * 1.4, nr), t + ga, rng.uniform(0.75, 1.0))
    # clusters of round nuclei (e.g. lymphoid / tumour cells)
    for _ in range(int(rng.integers(1, 4))):
        cx0, cy0 = rng.uniform(-1.0, 1.0, 2)
        spread = rng.uniform(0.15, 0.4)
        for _ in range(int(rng.integers(6, 22))):
            cx, cy = rng.normal((cx0, cy0), spread)
            nr = rng.uniform(0.04, 0.07) * zoom
            radii = (nr * rng.uniform(1.0, 1.4), nr)
            _blob(nuclei, x, y, px, (cx, cy), radii, rng.uniform(0, np.pi), rng.uniform(0.7, 1.0))
    # scattered spindle (fibroblast) nuclei along the fibres
    for _ in range(int(rng.integers(3, 12))):
        cx, cy = rng.uniform(-1.05, 1.05, 2)
        nr = rng.uniform(0.018, 0.03) * zoom
        radii = (nr * rng.uniform(3.0, 5.0), nr)
        _blob(nuclei, x, y, px, (cx, cy), radii, fib_ang + np.pi / 2 + rng.normal(0, 0.2), 0.9)

    chrom = np.clip(1.0 + 0.25 * _fine_noise(rng, size, 0.7 * size / 64), 0.3, 1.8)
    white = np.array([0.97, 0.96, 0.97])
    od = (
        (eosin_w * (1.0 - epith))[..., None] * _od(_EOSIN).astype(_F)
        + (epith * (1.0 - lumen))[..., None] * _od(_EPITH).astype(_F)
        + (lumen)[..., None] * _od(white).astype(_F)
        + (nuclei * chrom)[..., None] * (_od(_HEMA_NUC) - _od(_EOSIN) * 0.5).astype(_F)
    )
    return _finish(od.astype(_F), rng, 0.5, size)


# ----------------------------------------------------------------------------------------------
# Dataset writers
# ----------------------------------------------------------------------------------------------


def _progress(it: Iterable[_T], total: int, desc: str, enabled: bool) -> Iterable[_T]:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # no bar without tqdm
        return it
    return tqdm(it, total=total, desc=desc, unit="img")


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def _write_atomically(out: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary sibling folder, then move it to ``out`` (which is absent or empty)."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # (unlike tempfile.mkdtemp this honours the umask, as the final folder should)
    try:
        fill(tmp)
        _check_out(out)  # still absent or empty?
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_wbc_dataset(
    out: Path,
    n_per_class: int,
    size: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    classes: Sequence[str] = WBC_CLASSES,
    progress: bool = True,
) -> Path:
    """Write a labelled synthetic WBC dataset in ImageFolder layout.

    Layout (all paths in the CSV relative to ``out``)::

        out/<class>/<class>_00000.png         RGB crop
        out/masks/<class>/<class>_00000.png   L-mode 0/255 mask of the WBC
        out/metadata.csv                      columns path,label,mask_path

    Image ``i`` of class ``c`` is drawn from ``np.random.default_rng([seed, k, i])``
    where ``k`` is ``c``'s index in :data:`WBC_CLASSES`, so the same seed gives
    byte-identical files and a larger ``n_per_class`` (or a subset of
    ``classes``) leaves the shared images unchanged.

    Args:
        out: folder to create; it must not exist or be empty (never overwritten).
        n_per_class: images per class (>= 1).
        size: side of the square crops in pixels (>= 16).
        seed: non-negative integer seed.
        difficulty: nuisance / class-overlap level in [0, 1], see :func:`render_cell`.
        classes: which classes to write (default all of :data:`WBC_CLASSES`).
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        ``out``.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n_per_class = _check_count("n_per_class", n_per_class)
    size = _check_size(size)
    seed = _check_seed(seed)
    difficulty = _check_fraction("difficulty", difficulty)
    if isinstance(classes, str):
        raise LeukolabError(f"classes must be a sequence of class names, got the string {classes!r}")
    classes = [_check_label(c) for c in classes]
    if not classes:
        raise LeukolabError("classes must name at least one WBC class, got none")
    if len(set(classes)) != len(classes):
        raise LeukolabError(f"classes has duplicates: {', '.join(classes)}")
    out = _check_out(out)
    width = max(5, len(str(n_per_class - 1)))
    jobs = [(c, i) for c in classes for i in range(n_per_class)]

    def fill(root: Path) -> None:
        rows: list[tuple[str, str, str]] = []
        for c in classes:
            (root / c).mkdir()
            (root / "masks" / c).mkdir(parents=True)
        for c, i in _progress(jobs, len(jobs), "synthetic WBCs", progress):
            rng = np.random.default_rng([seed, WBC_CLASSES.index(c), i])
            img, mask = render_cell(c, size, rng, difficulty)
            name = f"{c}_{i:0{width}d}.png"
            _save_png(img, root / c / name)
            _save_png(mask.astype(np.uint8) * 255, root / "masks" / c / name)
            rows.append((f"{c}/{name}", c, f"masks/{c}/{name}"))
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "label", "mask_path"))
            w.writerows(rows)

    return _write_atomically(out, fill)


def _is_tissue(seed: int, i: int, fraction: float) -> bool:
    """Low-discrepancy choice of kind: the running tissue share stays close to ``fraction``."""
    offset = float(np.random.default_rng([seed, _POOL_STREAM]).random())
    return (offset + i * 0.6180339887498949) % 1.0 < fraction


def make_pool(
    out: Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    tissue_fraction: float = 0.3,
    difficulty: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write an unlabelled pretraining pool: WBC crops of random class mixed with tissue patches.

    Layout::

        out/pool_00000.png ...   flat folder of RGB PNGs
        out/pool.csv             columns path,kind (kind is ``wbc`` or ``tissue``)

    Image ``i`` is drawn from ``np.random.default_rng([seed, 1000, i])`` (a stream
    disjoint from :func:`make_wbc_dataset`'s), and whether it is tissue depends
    only on ``(seed, i)``, so a larger ``n`` leaves the first images unchanged.
    The tissue share is within about ``1/n`` of ``tissue_fraction``.

    Args:
        out: folder to create; it must not exist or be empty (never overwritten).
        n: number of images (>= 1).
        size: side of the square images in pixels (>= 16).
        seed: non-negative integer seed.
        tissue_fraction: share of tissue patches, in [0, 1].
        difficulty: difficulty of the WBC crops, see :func:`render_cell`.
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        ``out``.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n = _check_count("n", n)
    size = _check_size(size)
    seed = _check_seed(seed)
    tissue_fraction = _check_fraction("tissue_fraction", tissue_fraction)
    difficulty = _check_fraction("difficulty", difficulty)
    out = _check_out(out)
    width = max(5, len(str(n - 1)))

    def fill(root: Path) -> None:
        rows: list[tuple[str, str]] = []
        for i in _progress(range(n), n, "synthetic pool", progress):
            rng = np.random.default_rng([seed, _POOL_STREAM, i])
            if _is_tissue(seed, i, tissue_fraction):
                kind, img = "tissue", render_tissue_patch(size, rng)
            else:
                label = WBC_CLASSES[int(rng.integers(len(WBC_CLASSES)))]
                kind, img = "wbc", render_cell(label, size, rng, difficulty)[0]
            name = f"pool_{i:0{width}d}.png"
            _save_png(img, root / name)
            rows.append((name, kind))
        with open(root / "pool.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "kind"))
            w.writerows(rows)

    return _write_atomically(out, fill)
