"""Synthetic lymphocytosis patients: a bag of lymphocyte crops plus clinical data, reactive (0) or tumoral (1).

The layout is the public lymphocytosis cohort's (seed 002, DLMI)::

    out/<patient_id>/000000.png ...      lymphocyte crops of one patient (16-200 of them)
    out/clinical_annotation.csv          ID, LABEL, GENDER, DOB, LYMPH_COUNT
    out/cells.csv                        ID, file, kind   (ground truth of every crop; not in the cohort)

What tells the classes apart, and how much they overlap:

* **cells** - every patient's lymphocytes are mostly ordinary small lymphocytes.
  A tumoral patient also carries a share of *atypical* cells (:data:`ATYPIA`:
  cleaved or irregular nuclei, smudge cells, large cells with a nucleolus,
  coarse "soccer-ball" chromatin). The share is often small: about a third of
  tumoral patients have 2-8 % atypical cells, i.e. none or a few in a small bag,
  so the image alone cannot always decide and a *mean* over a big bag dilutes
  them. Reactive patients have at most 1.5 % atypical cells, and up to a quarter
  of *reactive* lymphocytes (large, with abundant deep-blue cytoplasm and a
  regular nucleus), which tumoral patients have fewer of: the mean appearance
  of a bag moves for the wrong reason.
* **clinical data** - tumoral patients have higher lymphocyte counts (log-normal,
  median 15 vs 5.5 x 10^9/L) and are older (72 +- 11 vs 55 +- 17 years), with
  overlap: a logistic regression on them is good but not perfect.

Everything is deterministic for a seed: patient ``i`` draws from
``np.random.default_rng([seed, 3000, i])`` and its cell ``j`` from
``np.random.default_rng([seed, 3000, i, j])``; the label of patient ``i``
depends only on ``(seed, i)`` (a low-discrepancy sequence keeps the tumoral
share within about ``1/n`` of ``tumoral_fraction``), so asking for more patients
leaves the first ones unchanged. Ages are counted at
:data:`REFERENCE_DATE`, the default reference date of :mod:`leukolab.data.mil`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from leukolab.data.synthetic.cells import _STYLE, BG, _add_rbcs
from leukolab.data.synthetic.checks import check_count, check_fraction, check_seed, check_size
from leukolab.data.synthetic.raster import F32, alpha, fine_noise, finish, fourier_field, grid, seg_dist, to_od
from leukolab.data.synthetic.writers import progress_bar, save_png
from leukolab.errors import LeukolabError
from leukolab.utils.files import atomic_folder

__all__ = ["ATYPIA", "CELL_KINDS", "REFERENCE_DATE", "PatientOptions", "make_patients", "render_lymphocyte"]

#: atypical lymphocyte morphologies of tumoral patients
ATYPIA: tuple[str, ...] = ("cleaved", "irregular", "smudge", "large", "coarse")
#: every kind of crop: ordinary lymphocytes, reactive lymphocytes (both classes) and the atypical ones
CELL_KINDS: tuple[str, ...] = ("typical", "reactive", *ATYPIA)
#: the date ages are counted at (also the default of :func:`leukolab.data.mil.read_clinical`)
REFERENCE_DATE = date(2020, 1, 1)

_PATIENT_STREAM = 3000  # second entropy word of patients (crops use 0..4, pools 1000, smears 2000)
_REACTIVE_CYTO = np.array([0.50, 0.66, 0.90])  # deeper blue, abundant cytoplasm of reactive lymphocytes
_SMUDGE = np.array([0.55, 0.45, 0.68])  # pale smeared nuclear material


@dataclass(frozen=True)
class PatientOptions:
    """What a synthetic cohort looks like.

    Attributes:
        n_patients: number of patients (>= 1).
        cells_min: fewest crops in a bag (>= 1).
        cells_max: most crops in a bag (>= ``cells_min``); bag sizes are uniform in between.
        size: side of the square crops in pixels (>= 16).
        seed: non-negative integer seed.
        tumoral_fraction: share of tumoral patients in [0, 1] (the cohort's is about 0.7).
        difficulty: nuisance level of the crops in [0, 1] (stain, blur, noise; see
            :func:`leukolab.data.synthetic.render_cell`).
    """

    n_patients: int = 60
    cells_min: int = 16
    cells_max: int = 200
    size: int = 64
    seed: int = 0
    tumoral_fraction: float = 0.7
    difficulty: float = 0.3

    def checked(self) -> PatientOptions:
        """These options, if every one is valid; else a one-line :class:`LeukolabError`."""
        check_count("n_patients", self.n_patients)
        check_count("cells_min", self.cells_min)
        check_count("cells_max", self.cells_max)
        if self.cells_max < self.cells_min:
            raise LeukolabError(f"cells_max {self.cells_max} is smaller than cells_min {self.cells_min}")
        check_size(self.size)
        check_seed(self.seed)
        check_fraction("tumoral_fraction", self.tumoral_fraction)
        check_fraction("difficulty", self.difficulty)
        return self


# ----------------------------------------------------------------------------------------------
# One lymphocyte crop
# ----------------------------------------------------------------------------------------------


def _nucleus_sdf(kind: str, lx: np.ndarray, ly: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed distance (cell-radius units, positive inside) of a lymphocyte nucleus of ``kind``."""
    small = kind in ("typical", "coarse", "cleaved", "irregular")
    r = rng.uniform(0.74, 0.86) if small else rng.uniform(0.5, 0.62)  # large cells: more cytoplasm
    off = rng.uniform(0.0, 0.9) * (0.95 - r)
    a = rng.uniform(0.0, 2.0 * np.pi)
    cx, cy = off * math.cos(a), off * math.sin(a)
    sdf = r - np.hypot(lx - F32(cx), ly - F32(cy))
    if kind == "cleaved":  # a deep cleft from the rim towards the centre ("buttock" / notched nucleus)
        b = rng.uniform(0.0, 2.0 * np.pi)
        depth = rng.uniform(0.55, 0.9) * r
        rim = np.array([cx + 1.1 * r * math.cos(b), cy + 1.1 * r * math.sin(b)])
        tip = np.array([cx + (r - depth) * math.cos(b), cy + (r - depth) * math.sin(b)])
        width = rng.uniform(0.06, 0.1)
        np.minimum(sdf, seg_dist(lx, ly, rim, tip) - F32(width), out=sdf)
    elif kind == "irregular":  # lobulated (clover-like), bumpy outline
        k = int(rng.integers(2, 5))
        b0 = rng.uniform(0.0, 2.0 * np.pi)
        sdf = np.full(lx.shape, -10.0, dtype=F32)
        for b in b0 + 2.0 * np.pi * (np.arange(k) + rng.uniform(-0.15, 0.15, k)) / k:
            lr, dist = r * rng.uniform(0.6, 0.72), r * rng.uniform(0.32, 0.42)
            np.maximum(sdf, lr - np.hypot(lx - F32(cx + dist * math.cos(b)), ly - F32(cy + dist * math.sin(b))),
                       out=sdf)
        sdf += fourier_field(rng, lx.shape[0], 4, 4.0) * F32(0.06)
    return sdf


def _smudge_layer(size: int, rng: np.random.Generator, od: np.ndarray) -> np.ndarray:
    """A smudge (basket) cell: a broken cell whose pale nuclear material is smeared out; returns its coverage."""
    x, y = grid(size)
    px = 2.0 / size
    R = rng.uniform(0.55, 0.8)
    a = rng.uniform(0.0, np.pi)
    e = rng.uniform(1.0, 1.6)  # smeared along one direction
    ca, sa = math.cos(a), math.sin(a)
    u = (x * ca + y * sa) / F32(R * e)
    v = (y * ca - x * sa) / F32(R / e)
    sdf = 1.0 - np.hypot(u, v) + fourier_field(rng, size, 6, 5.0) * F32(0.18)
    cover = alpha(sdf * F32(R / px), 2.5)
    streaks = np.clip(0.8 + 0.3 * fine_noise(rng, size, 1.8 * size / 64.0), 0.2, 1.4)
    density = cover * streaks * F32(rng.uniform(0.45, 0.75))
    od *= (1.0 - 0.6 * cover)[..., None]
    od += density[..., None] * (to_od(_SMUDGE) - 0.2 * to_od(BG)).astype(F32)
    return cover


def render_lymphocyte(kind: str, size: int, rng: np.random.Generator, difficulty: float = 0.3) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 smear crop of a lymphocyte of ``kind`` (one of :data:`CELL_KINDS`).

    Drawn like the crops of :func:`leukolab.data.synthetic.render_cell` (same
    background, red cells, colours and finishing step), with the morphology of
    ``kind``: a small round dense nucleus for ``typical``; a large cell with
    abundant deep-blue cytoplasm for ``reactive``; and the atypical
    :data:`ATYPIA`. The same generator state gives the same crop.
    """
    if kind not in CELL_KINDS:
        raise LeukolabError(f"unknown lymphocyte kind {kind!r}; expected one of {', '.join(CELL_KINDS)}")
    size = check_size(size)
    d = check_fraction("difficulty", difficulty)
    x, y = grid(size)
    px = 2.0 / size
    scale = size / 64.0
    zoom = rng.uniform(1.0 - 0.15 * d, 1.04)
    od = np.zeros((size, size, 3), dtype=F32)
    od[:] = to_od(BG).astype(F32)
    od *= (1.0 + (0.08 + 0.15 * d) * fourier_field(rng, size, 3, 2.5))[..., None]
    if kind == "smudge":
        _add_rbcs(od, rng, d, zoom, (0.0, 0.0, 0.6))
        _smudge_layer(size, rng, od)
        return finish(od, rng, d, scale)

    big = kind in ("reactive", "large")
    mean_r = (0.78 if big else 0.52) * rng.uniform(0.95, 1.08)
    R = min(0.95, zoom * mean_r * math.exp(rng.normal(0.0, 0.08)))
    ccx, ccy = (float(v) for v in np.clip(rng.normal(0.0, 0.03 + 0.05 * d, 2), -0.12, 0.12))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    elong = rng.uniform(0.0, 0.1 + 0.2 * d + (0.15 if big else 0.0))
    sa, sb = R * math.sqrt(1.0 + elong), R / math.sqrt(1.0 + elong)
    ct, st = math.cos(theta), math.sin(theta)
    dx, dy = x - F32(ccx), y - F32(ccy)
    lx = dx * F32(ct / sa) + dy * F32(st / sa)
    ly = dy * F32(ct / sb) - dx * F32(st / sb)
    wob = fourier_field(rng, size, 3, 3.0 / R) * F32(0.03 if not big else 0.06)
    cell_a = alpha((1.0 + wob - np.hypot(lx, ly)) * F32(min(sa, sb) / px), 1.3)

    _add_rbcs(od, rng, d, zoom, (ccx, ccy, R))
    od *= (1.0 - 0.8 * cell_a)[..., None]

    cyto_rgb, nuc_rgb, _ = _STYLE["lymphocyte"]
    if kind == "reactive":
        cyto_rgb = _REACTIVE_CYTO
    cyto_rgb = np.clip(cyto_rgb * np.exp(rng.normal(0.0, 0.02 + 0.04 * d, 3)), 0.05, 1.0)
    cyto_od = (to_od(cyto_rgb) - 0.2 * to_od(BG)).astype(F32)
    nuc_od = ((to_od(nuc_rgb) - to_od(cyto_rgb)) * rng.uniform(1.0 - 0.2 * d, 1.05)).astype(F32)
    cyto_tex = fine_noise(rng, size, 1.5 * scale) * F32(0.08 + 0.04 * d) + F32(1.0)
    od += (cyto_tex * cell_a)[..., None] * cyto_od

    nuc_sdf = _nucleus_sdf(kind, lx, ly, rng)
    nuc_sdf += fourier_field(rng, size, 4, 5.0 / R) * F32(0.03)
    nuc_a = alpha(nuc_sdf * F32(min(sa, sb) / px), 1.2) * cell_a
    # chromatin: fine and even; coarse clumps ("soccer ball") for coarse and large cells
    chrom_sd, chrom_px = (0.75, 2.6) if kind == "coarse" else (0.45, 1.8) if kind == "large" else (0.22, 1.1)
    chrom = np.clip(1.0 + chrom_sd * fine_noise(rng, size, chrom_px * scale), 0.2, 2.2)
    if kind == "large":  # a pale nucleolus
        nr = rng.uniform(0.1, 0.15)
        nx, ny = rng.uniform(-0.2, 0.2, 2)
        chrom *= 1.0 - 0.6 * alpha((F32(nr) - np.hypot(lx - F32(nx), ly - F32(ny))) * F32(min(sa, sb) / px))
    od += (nuc_a * chrom)[..., None] * nuc_od
    return finish(od, rng, d, scale)


# ----------------------------------------------------------------------------------------------
# Patients
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticPatient:
    """One synthetic patient: id, label (0 reactive, 1 tumoral), clinical data and the kind of each crop."""

    patient_id: str
    label: int
    gender: str
    dob: date
    lymph_count: float
    kinds: tuple[str, ...]


def _is_tumoral(seed: int, i: int, fraction: float) -> bool:
    """Low-discrepancy label draw: the running tumoral share stays close to ``fraction``."""
    offset = float(np.random.default_rng([seed, _PATIENT_STREAM]).random())
    return (offset + i * 0.6180339887498949) % 1.0 < fraction


def draw_patient(i: int, options: PatientOptions) -> SyntheticPatient:
    """The clinical data and cell kinds of patient ``i`` (deterministic for ``(options.seed, i)``)."""
    o = options
    tumoral = _is_tumoral(o.seed, i, o.tumoral_fraction)
    rng = np.random.default_rng([o.seed, _PATIENT_STREAM, i])
    n = int(rng.integers(o.cells_min, o.cells_max + 1))
    if tumoral:
        low = rng.random() < 0.35  # a third of tumoral patients show only a few atypical cells
        atypical = rng.uniform(0.02, 0.08) if low else rng.uniform(0.1, 0.5)
        reactive = rng.uniform(0.0, 0.1)
        lymph = math.exp(rng.normal(math.log(15.0), 0.85))
        age = rng.normal(72.0, 11.0)
        gender = "M" if rng.random() < 0.58 else "F"
    else:
        atypical = rng.uniform(0.0, 0.015)
        reactive = rng.uniform(0.0, 0.25)
        lymph = math.exp(rng.normal(math.log(5.5), 0.3))
        age = rng.normal(55.0, 17.0)
        gender = "M" if rng.random() < 0.45 else "F"
    # which cells are atypical (of which kind) and reactive: a share of the bag, drawn cell by cell
    u = rng.random(n)
    atypia = rng.choice(len(ATYPIA), size=n, p=rng.dirichlet(np.full(len(ATYPIA), 1.5)))
    kinds = tuple(
        ATYPIA[int(atypia[j])] if u[j] < atypical else "reactive" if u[j] < atypical + reactive else "typical"
        for j in range(n)
    )
    age = float(np.clip(age, 18.0, 98.0))
    dob = REFERENCE_DATE - timedelta(days=round(age * 365.25))
    return SyntheticPatient(f"P{i}", int(tumoral), gender, dob, round(float(np.clip(lymph, 1.0, 400.0)), 2), kinds)


def make_patients(out: Path | str, options: PatientOptions | None = None, progress: bool = True) -> Path:
    """Write a synthetic lymphocytosis cohort to the new folder ``out`` (layout in the module docstring).

    DOBs are written ``M/D/YYYY`` (the cohort's usual spelling), genders ``M``/``F``,
    lymphocyte counts in 10^9/L with two decimals.

    Raises:
        LeukolabError: a bad option or an existing non-empty ``out``.
    """
    o = (options or PatientOptions()).checked()
    patients = [draw_patient(i, o) for i in range(o.n_patients)]
    width = max(6, len(str(o.cells_max - 1)))
    total = sum(len(p.kinds) for p in patients)

    def fill(root: Path) -> None:
        cells: list[tuple[str, str, str]] = []
        jobs = [(i, p, j) for i, p in enumerate(patients) for j in range(len(p.kinds))]
        for i, p, j in progress_bar(jobs, total, "synthetic patients", progress):
            folder = root / p.patient_id
            folder.mkdir(exist_ok=True)
            name = f"{j:0{width}d}.png"
            img = render_lymphocyte(p.kinds[j], o.size, np.random.default_rng([o.seed, _PATIENT_STREAM, i, j]),
                                    o.difficulty)
            save_png(img, folder / name)
            cells.append((p.patient_id, name, p.kinds[j]))
        with open(root / "clinical_annotation.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"))
            for p in patients:
                w.writerow((p.patient_id, p.label, p.gender, f"{p.dob.month}/{p.dob.day}/{p.dob.year}",
                            f"{p.lymph_count:.2f}"))
        with open(root / "cells.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("ID", "file", "kind"))
            w.writerows(cells)

    return atomic_folder(Path(out), fill)
