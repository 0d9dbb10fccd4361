"""Off-domain H&E-like tissue patches (a stand-in for pRCC / Camelyon16 crops): unlabelled ones for pretraining
pools, and a labelled normal-vs-tumour variant (``leukolab synth tissue``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from leukolab.data.synthetic.checks import check_fraction, check_size
from leukolab.data.synthetic.raster import F32, alpha, fine_noise, finish, fourier_field, grid, to_od
from leukolab.errors import LeukolabError

_EOSIN = np.array([0.92, 0.62, 0.76])
_HEMA_NUC = np.array([0.34, 0.22, 0.52])
_EPITH = np.array([0.84, 0.58, 0.78])

#: the labels of :func:`render_tissue_patch`'s two-class variant (folder names of ``leukolab synth tissue``)
TISSUE_CLASSES = ("normal", "tumour")


def check_tissue_label(label: object) -> str:
    """``label`` if it is one of :data:`TISSUE_CLASSES`, else a one-line error."""
    if label not in TISSUE_CLASSES:
        raise LeukolabError(f"unknown tissue label {label!r}; expected one of: {', '.join(TISSUE_CLASSES)}")
    return str(label)


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


@dataclass
class _Canvas:
    """The coordinate grid of a patch and the coverage layers its structures are drawn into."""

    x: np.ndarray
    y: np.ndarray
    px: float
    zoom: float
    fib_ang: float
    nuclei: np.ndarray
    epith: np.ndarray
    lumen: np.ndarray

    def blob(self, layer: np.ndarray, centre: tuple[float, float], radii: tuple[float, float], angle: float,
             weight: float) -> None:
        _blob(layer, self.x, self.y, self.px, centre, radii, angle, weight)


def _gland(cv: _Canvas, rng: np.random.Generator, nuc_r: tuple[float, float], jitter: float,
           weight: tuple[float, float]) -> None:
    """A white lumen in a band of epithelium, its ring of basal nuclei (radius ``nuc_r`` * zoom)."""
    zoom = cv.zoom
    gx, gy = rng.uniform(-0.8, 0.8, 2)
    lr = rng.uniform(0.15, 0.35) * zoom
    le = rng.uniform(0.7, 1.0)
    ga = rng.uniform(0.0, np.pi)
    band = rng.uniform(0.12, 0.2) * zoom
    cv.blob(cv.epith, (gx, gy), (lr + band, (lr + band) * le), ga, 1.0)
    cv.blob(cv.lumen, (gx, gy), (lr, lr * le), ga, 1.0)
    n_ring = max(6, int(2 * np.pi * (lr + band / 2) / (0.11 * zoom)))
    for k in range(n_ring):
        t = 2 * np.pi * k / n_ring + rng.normal(0.0, jitter)
        rr = lr + band * rng.uniform(0.5, 0.75)
        ex, ey = rr * math.cos(t), rr * le * math.sin(t)
        c, s = math.cos(ga), math.sin(ga)
        cx, cy = gx + ex * c - ey * s, gy + ex * s + ey * c
        nr = rng.uniform(*nuc_r) * zoom
        cv.blob(cv.nuclei, (cx, cy), (nr * 1.4, nr), t + ga, rng.uniform(*weight))


def _spindles(cv: _Canvas, rng: np.random.Generator, count: int) -> None:
    """``count`` scattered spindle (fibroblast) nuclei along the fibres."""
    for _ in range(count):
        cx, cy = rng.uniform(-1.05, 1.05, 2)
        nr = rng.uniform(0.018, 0.03) * cv.zoom
        radii = (nr * rng.uniform(3.0, 5.0), nr)
        cv.blob(cv.nuclei, (cx, cy), radii, cv.fib_ang + np.pi / 2 + rng.normal(0, 0.2), 0.9)


def _mixed_structures(cv: _Canvas, rng: np.random.Generator) -> None:
    """The unlabelled patch of pretraining pools: glands, clusters of round nuclei, spindle nuclei."""
    for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))):
        _gland(cv, rng, (0.035, 0.05), 0.05, (0.75, 1.0))
    # clusters of round nuclei (e.g. lymphoid / tumour cells)
    for _ in range(int(rng.integers(1, 4))):
        cx0, cy0 = rng.uniform(-1.0, 1.0, 2)
        spread = rng.uniform(0.15, 0.4)
        for _ in range(int(rng.integers(6, 22))):
            cx, cy = rng.normal((cx0, cy0), spread)
            nr = rng.uniform(0.04, 0.07) * cv.zoom
            radii = (nr * rng.uniform(1.0, 1.4), nr)
            cv.blob(cv.nuclei, (cx, cy), radii, rng.uniform(0, np.pi), rng.uniform(0.7, 1.0))
    _spindles(cv, rng, int(rng.integers(3, 12)))


def _normal_structures(cv: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    """Benign tissue: regular glands, small round evenly spaced nuclei in rows along the fibres; with
    probability ``0.6 * difficulty`` a small dense lymphoid aggregate (a mimic of crowding)."""
    zoom = cv.zoom
    for _ in range(int(rng.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))):
        _gland(cv, rng, (0.03, 0.036), 0.015, (0.6, 0.75))
    # rows of evenly spaced small nuclei (a jittered lattice aligned with the fibres)
    step = rng.uniform(0.17, 0.22) * zoom
    c, s = math.cos(cv.fib_ang), math.sin(cv.fib_ang)
    cx0, cy0 = rng.uniform(-0.5, 0.5, 2)
    extent = rng.uniform(0.5, 0.9)
    n = int(extent / step)
    for i in range(-n, n + 1):
        for j in range(-n, n + 1):
            if rng.random() < 0.35:
                continue
            u, v = i * step + rng.normal(0, 0.012), j * step * 1.3 + rng.normal(0, 0.012)
            cx, cy = cx0 + u * c - v * s, cy0 + u * s + v * c
            nr = rng.uniform(0.03, 0.037) * zoom
            cv.blob(cv.nuclei, (cx, cy), (nr * rng.uniform(1.0, 1.15), nr), rng.uniform(0, np.pi),
                    rng.uniform(0.6, 0.75))
    if rng.random() < 0.6 * difficulty:  # lymphoid aggregate: crowded but small, round and uniform
        lx, ly = rng.uniform(-0.8, 0.8, 2)
        spread = rng.uniform(0.1, 0.2)
        for _ in range(int(rng.integers(10, 25))):
            cx, cy = rng.normal((lx, ly), spread)
            nr = rng.uniform(0.03, 0.04) * zoom
            cv.blob(cv.nuclei, (cx, cy), (nr, nr), 0.0, rng.uniform(0.85, 1.0))
    _spindles(cv, rng, int(rng.integers(4, 12)))


def _tumour_structures(cv: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    """Carcinoma: sheets of crowded, large, pleomorphic nuclei overrunning the stroma (few glands, few
    fibroblasts); with probability ``0.6 * difficulty`` only a small focus at the patch edge."""
    zoom = cv.zoom
    small_focus = rng.random() < 0.6 * difficulty
    if rng.random() < 0.2:  # a residual, distorted gland
        _gland(cv, rng, (0.04, 0.07), 0.15, (0.8, 1.0))
    n_foci = 1 if small_focus else int(rng.integers(1, 4))
    for _ in range(n_foci):
        if small_focus:
            t = rng.uniform(0, 2 * np.pi)
            cx0, cy0 = 0.95 * math.cos(t), 0.95 * math.sin(t)
            spread, count = rng.uniform(0.12, 0.22), int(rng.integers(5, 12))
        else:
            cx0, cy0 = rng.uniform(-0.7, 0.7, 2)
            spread, count = rng.uniform(0.25, 0.5), int(rng.integers(15, 35))
        for _ in range(count):
            cx, cy = rng.normal((cx0, cy0), spread)
            nr = rng.uniform(0.05, 0.085) * zoom * float(np.exp(rng.normal(0.0, 0.25)))  # pleomorphic sizes
            radii = (nr * rng.uniform(1.0, 1.8), nr)
            cv.blob(cv.nuclei, (cx, cy), radii, rng.uniform(0, np.pi), rng.uniform(0.85, 1.0))
    _spindles(cv, rng, int(rng.integers(1, 5)))


def render_tissue_patch(size: int, rng: np.random.Generator, label: str | None = None,
                        difficulty: float = 0.5) -> np.ndarray:
    """Render an off-domain H&E-like tissue patch (a stand-in for pRCC / Camelyon16 crops).

    Pink fibrous stroma, clusters of purple nuclei, scattered spindle nuclei and
    sometimes glands (a white lumen lined by epithelial cells and their nuclei).
    There is no cell of interest and hence no mask.

    With a ``label`` from :data:`TISSUE_CLASSES` the patch is one of two classes
    (the seeds' Camelyon16 normal-vs-tumour task): ``normal`` has small regular,
    evenly spaced nuclei and regular glands; ``tumour`` has crowded sheets of
    larger, pleomorphic, hyperchromatic nuclei. ``difficulty`` in [0, 1] adds
    look-alikes (lymphoid aggregates in normal tissue, small edge foci of tumour).
    Without a label (pretraining pools) the patch is as it always was.

    Args:
        size: side of the square patch in pixels (>= 16).
        rng: the random generator that decides everything about the patch.
        label: ``None`` (unlabelled), ``"normal"`` or ``"tumour"``.
        difficulty: class overlap of labelled patches, in [0, 1] (ignored without a label).

    Returns:
        An ``(size, size, 3)`` uint8 RGB image.

    Raises:
        LeukolabError: ``size`` < 16, an unknown ``label`` or ``difficulty`` outside [0, 1].
    """
    size = check_size(size)
    if label is not None:
        label = check_tissue_label(label)
        difficulty = check_fraction("difficulty", difficulty)
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

    cv = _Canvas(x, y, px, zoom, fib_ang, np.zeros_like(x), np.zeros_like(x), np.zeros_like(x))
    if label is None:
        _mixed_structures(cv, rng)
    elif label == "normal":
        _normal_structures(cv, rng, difficulty)
    else:
        _tumour_structures(cv, rng, difficulty)
    nuclei, epith, lumen = cv.nuclei, cv.epith, cv.lumen

    chrom = np.clip(1.0 + 0.25 * fine_noise(rng, size, 0.7 * size / 64), 0.3, 1.8)
    if label is not None:  # hyperchromasia: tumour nuclei stain darker (the gap narrows with difficulty)
        gap = 0.45 * (1.0 - 0.5 * difficulty)
        chrom = chrom * F32((1.0 + gap if label == "tumour" else 1.0) * rng.uniform(0.9, 1.1))
    white = np.array([0.97, 0.96, 0.97])
    od = (
        (eosin_w * (1.0 - epith))[..., None] * to_od(_EOSIN).astype(F32)
        + (epith * (1.0 - lumen))[..., None] * to_od(_EPITH).astype(F32)
        + (lumen)[..., None] * to_od(white).astype(F32)
        + (nuclei * chrom)[..., None] * (to_od(_HEMA_NUC) - to_od(_EOSIN) * 0.5).astype(F32)
    )
    return finish(od.astype(F32), rng, 0.5, size / 64.0)
