"""Off-domain H&E-like tissue patches (a stand-in for pRCC / Camelyon16 crops) for pretraining pools."""

from __future__ import annotations

import math

import numpy as np

from leukolab.data.synthetic.checks import check_size
from leukolab.data.synthetic.raster import F32, alpha, fine_noise, finish, fourier_field, grid, to_od

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
    a = alpha(sdf, 1.2) * weight
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
    size = check_size(size)
    x, y = grid(size)
    px = 2.0 / size
    zoom = rng.uniform(0.7, 1.3)

    # stroma: wavy eosin fibres
    fib_ang = rng.uniform(0.0, np.pi)
    warp = fourier_field(rng, size, 3, 2.0)
    along = -x * math.sin(fib_ang) + y * math.cos(fib_ang)
    fibres = np.sin(along * rng.uniform(14.0, 26.0) / zoom + 2.0 * warp)
    stroma = 0.75 + 0.18 * fibres + 0.12 * fine_noise(rng, size, 0.8 * size / 64)
    stroma *= 1.0 + 0.2 * fourier_field(rng, size, 3, 3.0)
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

    chrom = np.clip(1.0 + 0.25 * fine_noise(rng, size, 0.7 * size / 64), 0.3, 1.8)
    white = np.array([0.97, 0.96, 0.97])
    od = (
        (eosin_w * (1.0 - epith))[..., None] * to_od(_EOSIN).astype(F32)
        + (epith * (1.0 - lumen))[..., None] * to_od(_EPITH).astype(F32)
        + (lumen)[..., None] * to_od(white).astype(F32)
        + (nuclei * chrom)[..., None] * (to_od(_HEMA_NUC) - to_od(_EOSIN) * 0.5).astype(F32)
    )
    return finish(od.astype(F32), rng, 0.5, size / 64.0)
