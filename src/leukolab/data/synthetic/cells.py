"""Synthetic white blood cells: morphology by class, drawn on a smear crop or as a layer for a smear field.

The five classes carry the morphology a hematologist would name:

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

Higher ``difficulty`` pulls the classes towards each other (overlapping sizes,
merging lobes, sparser / fainter granules, class colours mixed towards a common
one, lower nuclear contrast) on top of the nuisance variation of
:func:`leukolab.data.synthetic.raster.finish`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from leukolab.data.synthetic.checks import check_fraction, check_size
from leukolab.data.synthetic.raster import (
    F32,
    alpha,
    fine_noise,
    finish,
    fourier_field,
    grid,
    seg_dist,
    splat,
    to_od,
)
from leukolab.errors import LeukolabError

WBC_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
"""The five WBC classes, in the (alphabetical, ImageFolder) order used for class indices."""


def check_label(label: object) -> str:
    """``label`` if it is one of :data:`WBC_CLASSES`."""
    if label not in WBC_CLASSES:
        raise LeukolabError(f"unknown WBC class {label!r}; expected one of {', '.join(WBC_CLASSES)}")
    return str(label)


# ----------------------------------------------------------------------------------------------
# Colours (RGB in [0, 1], the *appearance* of a region over what lies beneath it)
# ----------------------------------------------------------------------------------------------

BG = np.array([0.93, 0.87, 0.85])  # pale pink/beige plasma
RBC = np.array([0.88, 0.62, 0.62])  # red-cell rim
RBC_PALLOR = np.array([0.94, 0.84, 0.83])  # paler centre

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
    sdf = np.full(lx.shape, -10.0, dtype=F32)
    for (cx, cy), r in zip(centres.tolist(), radii.tolist(), strict=True):
        if rng is None:
            np.maximum(sdf, r - np.hypot(lx - F32(cx), ly - F32(cy)), out=sdf)
        else:
            half = r * rng.uniform(0.0, 0.45)
            a = rng.uniform(0.0, np.pi)
            off = half * np.array([math.cos(a), math.sin(a)])
            r_cap = r - 0.3 * half  # keep the area about the same
            c = np.array([cx, cy])
            np.maximum(sdf, r_cap - seg_dist(lx, ly, c - off, c + off), out=sdf)
    for i in range(len(centres) - 1):
        np.maximum(sdf, strand - seg_dist(lx, ly, centres[i], centres[i + 1]), out=sdf)
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
        sdf = r - np.hypot(lx - F32(cx), ly - F32(cy))
        if rng.random() < 0.3:  # slight indentation
            b = rng.uniform(0.0, 2.0 * np.pi)
            nr = rng.uniform(0.15, 0.3) * r
            nx, ny = cx + (r + 0.6 * nr) * math.cos(b), cy + (r + 0.6 * nr) * math.sin(b)
            np.minimum(sdf, np.hypot(lx - F32(nx), ly - F32(ny)) - F32(nr), out=sdf)
        return sdf
    if label == "monocyte":
        # thick arc: kidney (short span) ... horseshoe (long span); sometimes folded over
        span = rng.uniform(1.3, 3.6) if rng.random() >= 0.3 * d else rng.uniform(0.3, 1.3)  # barely indented
        ra = rng.uniform(0.3, 0.42)
        w = rng.uniform(0.21, 0.3) + 0.05 * (3.6 - span) / 2.3
        # put the arc's centroid near the cell centre, with a little eccentricity
        shift = ra * math.sin(span / 2) / (span / 2) + rng.uniform(-0.08, 0.08)
        ux = lx + F32(shift)
        uy = ly + F32(rng.uniform(-0.08, 0.08))
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
def rbc_sprite(r_px: float, e: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and central-pallor weight of one red cell centred on a pixel centre (cached)."""
    h = math.ceil(r_px * (1.0 + e) + 2)
    c = np.arange(-h, h + 1, dtype=np.float64)
    xs, ys = np.meshgrid(c, c)
    ct, st = math.cos(t), math.sin(t)
    u = (xs * ct + ys * st) * (1.0 - e / 2)
    v = (ys * ct - xs * st) * (1.0 + e / 2)
    rho = np.hypot(u, v) / r_px
    a = alpha((1.0 - rho) * r_px, 1.2)
    pal = a * np.exp(-((rho / 0.62) ** 4))
    a.setflags(write=False)
    pal.setflags(write=False)
    return a.astype(F32), pal.astype(F32)


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
    amount = np.zeros((size, size), dtype=F32)
    pallor = np.zeros((size, size), dtype=F32)
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
        a, pal = rbc_sprite(round(r / px * 4) / 4, round(e * 3) * 0.05, round(t * 6) * np.pi / 6)
        h = a.shape[0] // 2
        ci, ri = int((cx + 1.0) / px), int((cy + 1.0) / px)  # pixel holding the centre
        c0, c1, r0, r1 = max(0, ci - h), min(size, ci + h + 1), max(0, ri - h), min(size, ri + h + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        win = (slice(r0 - ri + h, r1 - ri + h), slice(c0 - ci + h, c1 - ci + h))
        amount[r0:r1, c0:c1] += a[win] * F32(0.85 + 0.3 * strength)
        pallor[r0:r1, c0:c1] += pal[win] * F32((0.85 + 0.3 * strength) * (0.6 + 0.4 * pal_strength))
    od += amount[..., None] * to_od(RBC).astype(F32)
    od += pallor[..., None] * (to_od(RBC_PALLOR) - to_od(RBC)).astype(F32)


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
    label = check_label(label)
    size = check_size(size)
    d = check_fraction("difficulty", difficulty)
    od, cell_a = cell_layer(label, size, rng, d, backdrop=True)
    img = finish(od, rng, d, size / 64.0)
    return img, cell_a >= 0.5


def cell_layer(
    label: str, size: int, rng: np.random.Generator, d: float, backdrop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The optical density of a WBC crop before finishing, and the cell's coverage.

    With ``backdrop`` the crop has a smear background and red cells behind the
    WBC (what :func:`render_cell` finishes into a picture). Without it the
    optical density is the WBC's own layer over nothing: composite it onto a
    field's optical density ``field`` as ``field * (1 - 0.8 * coverage) + layer``.
    Arguments are not checked (see :func:`render_cell`).

    Returns:
        ``(od, coverage)``: ``(size, size, 3)`` and ``(size, size)`` float32 arrays.
    """
    x, y = grid(size)
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
    dx, dy = x - F32(ccx), y - F32(ccy)
    lx = dx * F32(ct / sa) + dy * F32(st / sa)  # local frame, in units of the cell radius
    ly = dy * F32(ct / sb) - dx * F32(st / sb)
    rho = np.hypot(lx, ly)
    wob = fourier_field(rng, size, 3, 3.0 / R) * F32(0.025)
    to_px = min(sa, sb) / px
    cell_a = alpha((1.0 + wob - rho) * F32(to_px), 1.3)

    # --- background and red cells (behind the WBC) -----------------------------------------------
    od = np.zeros((size, size, 3), dtype=F32)
    if backdrop:
        od[:] = to_od(BG).astype(F32)
        od *= (1.0 + (0.08 + 0.15 * d) * fourier_field(rng, size, 3, 2.5))[..., None]
        _add_rbcs(od, rng, d, zoom, (ccx, ccy, R))
        od *= (1.0 - 0.8 * cell_a)[..., None]

    # --- colours (drift towards a common cytoplasm colour at high difficulty) --------------------
    mix = rng.uniform(0.0, 0.8 * d)
    cyto_rgb = cyto_rgb + (_COMMON_CYTO - cyto_rgb) * mix
    cyto_rgb = np.clip(cyto_rgb * np.exp(rng.normal(0.0, 0.02 + 0.04 * d, 3)), 0.05, 1.0)
    cyto_od = (to_od(cyto_rgb) - 0.2 * to_od(BG)).astype(F32)
    nuc_contrast = rng.uniform(1.0 - 0.3 * d, 1.05)
    nuc_od = ((to_od(nuc_rgb) - to_od(cyto_rgb)) * nuc_contrast).astype(F32)

    cyto_tex = fine_noise(rng, size, 1.5 * scale)
    cyto_tex *= F32(0.08 + 0.04 * d)
    cyto_tex += 1.0
    cyto_tex *= cell_a
    od += cyto_tex[..., None] * cyto_od

    # --- nucleus with chromatin texture ----------------------------------------------------------
    nuc_sdf = _nucleus(label, lx, ly, rng, d)
    nuc_sdf += fourier_field(rng, size, 4, 5.0 / R) * F32(0.03)  # irregular outline
    nuc_a = alpha(nuc_sdf * F32(to_px), 1.2) * cell_a
    chrom_sd, chrom_px = _CHROMATIN[label]
    chrom = np.clip(1.0 + chrom_sd * fine_noise(rng, size, chrom_px * scale), 0.2, 2.0)
    od += (nuc_a * chrom)[..., None] * nuc_od

    # --- cytoplasmic features -----------------------------------------------------------------
    if label == "monocyte":  # a few clear vacuoles
        vac = np.zeros_like(rho)
        for _ in range(int(rng.integers(1, 6))):
            vr = rng.uniform(0.05, 0.1)
            a = rng.uniform(0.0, 2.0 * np.pi)
            dist = rng.uniform(0.55, 0.85)
            vx, vy = F32(dist * math.cos(a)), F32(dist * math.sin(a))
            np.maximum(vac, alpha((F32(vr) - np.hypot(lx - vx, ly - vy)) * F32(to_px)), out=vac)
        vac *= cell_a * (1.0 - nuc_a) * F32(rng.uniform(0.6, 0.9))
        od += vac[..., None] * (to_od(_VACUOLE) - to_od(cyto_rgb)).astype(F32)

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
        gran = splat(size, (gx + 1.0) / px - 0.5, (gy + 1.0) / px - 0.5, w, g_sigma * scale)
        np.clip(gran, 0.0, 1.0, out=gran)
        gran *= cell_a * (1.0 - (1.0 - over_nuc) * nuc_a)
        under = to_od(cyto_rgb) if over_nuc < 1.0 else 0.4 * to_od(cyto_rgb) + 0.6 * to_od(nuc_rgb)
        od += gran[..., None] * (to_od(gran_rgb) - under).astype(F32)

    return od, cell_a
