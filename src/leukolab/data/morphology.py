"""Hand-crafted morphology of a white cell: size, nucleus shape, chromatin and cytoplasm stain, as numbers.

:func:`cell_morphology` segments the cell at the centre of a crop with
:func:`leukolab.data.masks.segment_cell`, splits it into nucleus (the pixels of
the cell whose "purple" score ``2 * OD_G - OD_B`` lies above an Otsu threshold
within the cell, largest component) and cytoplasm (the rest), and measures the
quantities haematologists describe lymphocytes by (:data:`FEATURE_NAMES`):

* size: cell and nucleus area as fractions of the crop (so the resize a cohort's
  crops get does not matter, only the magnification), nucleus-to-cell ratio;
* nucleus shape: solidity (area / convex hull area: cleaved and notched nuclei
  score low), circularity (4 pi area / perimeter^2), elongation (ratio of the
  principal axes), and the cell's elongation;
* chromatin: mean and spread of the nucleus' optical density, and its texture
  (mean absolute Laplacian of Gaussian: clumped chromatin scores high);
* cytoplasm: mean optical density and the share of it absorbed in the red
  channel (basophilic, blue cytoplasm absorbs red light);
* ``found``: 1 when a cell was segmented (all other features 0 when not).

The MIL task uses them as a cell encoder (``leukolab mil train --encoder
morphology``); Sahasrabudhe et al. 2021 report such hand-crafted features on the
lymphocytosis cohort as a baseline. numpy + scipy only, no training.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from leukolab.data.masks import optical_density, otsu, purple_score, segment_cell

__all__ = ["FEATURE_NAMES", "cell_morphology"]

#: the features :func:`cell_morphology` returns, in order
FEATURE_NAMES: tuple[str, ...] = (
    "cell_area",
    "nucleus_area",
    "nc_ratio",
    "nucleus_solidity",
    "nucleus_circularity",
    "nucleus_elongation",
    "cell_elongation",
    "nucleus_od",
    "nucleus_od_std",
    "chromatin_texture",
    "cytoplasm_od",
    "cytoplasm_red_share",
    "found",
)
_MIN_CELL_PIXELS = 20  # a "cell" smaller than this is no cell
_MIN_CYTOPLASM_PIXELS = 5


def _elongation(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return 1.0
    ev = np.sort(np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64))))
    return float(np.sqrt(ev[1] / max(ev[0], 1e-6)))


def _solidity(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    try:
        hull = ConvexHull(np.stack([xs, ys], axis=1).astype(np.float64))
    except (QhullError, ValueError):  # a line or a point of pixels
        return 1.0
    return float(min(1.0, mask.sum() / max(hull.volume, 1.0)))


def cell_morphology(rgb: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` of the white cell at (or nearest) the centre of an ``(H, W, 3)`` uint8 crop.

    Returns a float32 vector; all zeros (``found`` = 0) when no stained cell is found. Never raises on odd input.
    """
    out = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 4:
        return out
    arr = arr.astype(np.uint8, copy=False)
    cell = segment_cell(arr)
    n_cell = int(cell.sum())
    if n_cell < _MIN_CELL_PIXELS:
        return out
    od = optical_density(arr.astype(np.float32))
    density = od.sum(axis=2)
    purple = purple_score(od)
    threshold, _ = otsu(purple[cell])
    nucleus = cell & (purple > threshold)
    labels, n = ndimage.label(nucleus)
    if n > 1:
        sizes = ndimage.sum(nucleus, labels, index=np.arange(1, n + 1))
        nucleus = labels == 1 + int(np.argmax(sizes))
    n_nucleus = int(nucleus.sum())
    if n_nucleus == 0:
        nucleus = cell
        n_nucleus = n_cell
    area = float(arr.shape[0] * arr.shape[1])
    perimeter = float((nucleus & ~ndimage.binary_erosion(nucleus)).sum())
    texture = np.abs(ndimage.gaussian_laplace(density, 1.0))
    cytoplasm = cell & ~nucleus
    values = {
        "cell_area": n_cell / area,
        "nucleus_area": n_nucleus / area,
        "nc_ratio": n_nucleus / n_cell,
        "nucleus_solidity": _solidity(nucleus),
        "nucleus_circularity": min(1.0, 4.0 * np.pi * n_nucleus / max(perimeter, 1.0) ** 2),
        "nucleus_elongation": _elongation(nucleus),
        "cell_elongation": _elongation(cell),
        "nucleus_od": float(density[nucleus].mean()),
        "nucleus_od_std": float(density[nucleus].std()),
        "chromatin_texture": float(texture[nucleus].mean()),
        "found": 1.0,
    }
    if cytoplasm.sum() >= _MIN_CYTOPLASM_PIXELS:
        values["cytoplasm_od"] = float(density[cytoplasm].mean())
        values["cytoplasm_red_share"] = float((od[..., 0] / (density + 1e-3))[cytoplasm].mean())
    for i, name in enumerate(FEATURE_NAMES):
        out[i] = values.get(name, 0.0)
    return out
