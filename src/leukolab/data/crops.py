"""Crop geometry of a cell in a smear field: a square around its box, with a margin, padded at the borders.

A detector's box is tight around the cell; a classifier trained on cell crops
(PBC / CellaVision: 360 px crops in which the cell is about half as wide, with
red cells around it) expects the cell framed with some of its surroundings.
:func:`square_around` turns a box into that square: centred on the box, with
side ``max(w, h) * (1 + 2 * margin)`` (``margin`` is the fraction of the box
side added on *each* side: 0.5 doubles the side, the cell then fills half the
crop as in PBC). :func:`crop_square` cuts the square out of the field; where it
leaves the image, the missing pixels are the field's median colour (the plasma
between cells, the default) or the image mirrored at its border.

All coordinates are pixel edges (``x1, y1, x2, y2``, ``x2`` exclusive) in the
field's own pixels; everything here is pure numpy and exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from leukolab.errors import LeukolabError

__all__ = [
    "DEFAULT_MARGIN",
    "PAD_MODES",
    "WHITE_CELL_NAMES",
    "boxes_overlap",
    "class_key",
    "crop_square",
    "field_fill",
    "random_squares",
    "reflect_index",
    "square_around",
    "white_cell_class",
]

#: fraction of the box side added on each side of a cell's box (crop side = 2 x box side, as PBC frames a cell)
DEFAULT_MARGIN = 0.5
#: how pixels outside the field are filled
PAD_MODES = ("reflect", "median")
#: detection class names (normalised: lower case, ``_``/``-`` as spaces) that mean "white blood cell";
#: BCCD and ``leukolab synth smears`` call it ``WBC``
WHITE_CELL_NAMES = ("wbc", "white cell", "white cells", "white blood cell", "white blood cells", "leukocyte",
                    "leukocytes", "leucocyte", "leucocytes")
PadMode = Literal["median", "reflect"]
Square = tuple[int, int, int, int]


def class_key(name: str) -> str:
    """A class name compared the way :data:`WHITE_CELL_NAMES` are: lower case, ``_``/``-`` and runs of
    spaces as one space."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").split()).lower()


def white_cell_class(classes: Sequence[str], requested: str | None = None) -> int:
    """Index of the white-cell class among a detector's ``classes``.

    ``requested`` (``--cell-class``) names it; otherwise a detector with one class uses that class,
    and one with several the class named like :data:`WHITE_CELL_NAMES` (``WBC`` in BCCD).
    """
    keys = [class_key(c) for c in classes]
    if requested is not None:
        key = class_key(requested)
        if key not in keys:
            raise LeukolabError(f"--cell-class {requested!r}: not a class of the detector; expected one of "
                                f"{', '.join(classes)}")
        return keys.index(key)
    if len(keys) == 1:
        return 0
    found = [i for i, k in enumerate(keys) if k in WHITE_CELL_NAMES]
    if len(found) != 1:
        raise LeukolabError(f"the detector's classes ({', '.join(classes)}) name no single white-cell class; "
                            "pass --cell-class NAME")
    return found[0]


def _round(v: float) -> int:
    """Round half up (``np.round`` rounds half to even, which would make crops shift with parity)."""
    return math.floor(v + 0.5)


def square_around(box: Sequence[float], margin: float = DEFAULT_MARGIN) -> Square:
    """The integer square ``(x1, y1, x2, y2)`` centred on ``box`` with side ``max(w, h) * (1 + 2 * margin)``.

    The side is rounded to whole pixels (at least 1) and the square's top-left corner to the nearest pixel
    edge (half up), so the square's centre is within half a pixel of the box's.
    """
    if not margin >= 0 or not math.isfinite(margin):
        raise LeukolabError(f"--margin {margin}: expected a fraction of the box side >= 0, e.g. {DEFAULT_MARGIN}")
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(1, _round(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)))
    left = _round((x1 + x2) / 2.0 - side / 2.0)
    top = _round((y1 + y2) / 2.0 - side / 2.0)
    return left, top, left + side, top + side


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Indices into an axis of length ``n`` mirrored at its ends without repeating the edge pixel
    (numpy's ``mode="reflect"``: ``-1 -> 1``, ``n -> n - 2``), periodically for indices far outside."""
    index = np.asarray(index, dtype=np.int64)
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    m = np.mod(index, period)
    return np.where(m < n, m, period - m)


def field_fill(image: np.ndarray) -> np.ndarray:
    """The field's median colour (per channel, uint8): the plasma between cells on a smear."""
    flat = np.asarray(image).reshape(-1, np.asarray(image).shape[-1] if np.asarray(image).ndim == 3 else 1)
    return np.round(np.median(flat, axis=0)).astype(np.uint8)


def crop_square(
    image: np.ndarray, square: Sequence[int], pad: PadMode = "reflect", fill: np.ndarray | None = None
) -> np.ndarray:
    """The pixels of ``square`` (from :func:`square_around`) in ``image`` (H, W[, C]), padded where it leaves it.

    Args:
        image: the field.
        square: integer ``(x1, y1, x2, y2)``, possibly partly or wholly outside the image.
        pad: ``reflect`` mirrors the image at its borders; ``median`` fills outside pixels with ``fill``
            (default: :func:`field_fill` of the image).
        fill: the colour for ``median`` (pass it once per field to avoid recomputing the median per crop).
    """
    if pad not in PAD_MODES:
        raise LeukolabError(f"--pad {pad!r}: expected one of {', '.join(PAD_MODES)}")
    image = np.asarray(image)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in square)
    if x2 <= x1 or y2 <= y1:
        raise LeukolabError(f"crop {square}: expected x2 > x1 and y2 > y1")
    if x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h:
        return image[y1:y2, x1:x2].copy()
    if pad == "reflect":
        rows = reflect_index(np.arange(y1, y2), h)
        cols = reflect_index(np.arange(x1, x2), w)
        return image[np.ix_(rows, cols)].copy()
    colour = field_fill(image) if fill is None else np.asarray(fill, dtype=image.dtype)
    out = np.empty((y2 - y1, x2 - x1, *image.shape[2:]), dtype=image.dtype)
    out[...] = colour
    r0, r1, c0, c1 = max(y1, 0), min(y2, h), max(x1, 0), min(x2, w)
    if r1 > r0 and c1 > c0:
        out[r0 - y1 : r1 - y1, c0 - x1 : c1 - x1] = image[r0:r1, c0:c1]
    return out


def boxes_overlap(box: Sequence[float], others: np.ndarray) -> np.ndarray:
    """Whether ``box`` shares a positive area with each of ``others`` (M, 4)."""
    others = np.asarray(others, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (np.minimum(x2, others[:, 2]) > np.maximum(x1, others[:, 0])) & (
        np.minimum(y2, others[:, 3]) > np.maximum(y1, others[:, 1]))


def random_squares(
    width: int, height: int, side: int, avoid: np.ndarray, n: int, rng: np.random.Generator, tries: int = 50
) -> list[Square]:
    """Up to ``n`` squares of ``side`` px lying inside the field and overlapping none of the ``avoid`` boxes.

    Such a square's centre lies at least half a side away from every avoided box (outside each box grown
    by ``side / 2``), so it holds no whole white cell. Squares may overlap each other. Fewer than ``n`` come
    back when ``tries`` random draws per square find no free place (a crowded field, or a side larger
    than the field).
    """
    out: list[Square] = []
    if side < 1 or side > width or side > height:
        return out
    avoid = np.asarray(avoid, dtype=np.float64).reshape(-1, 4)
    for _ in range(n):
        for _try in range(tries):
            x = int(rng.integers(0, width - side + 1))
            y = int(rng.integers(0, height - side + 1))
            sq = (x, y, x + side, y + side)
            if not boxes_overlap(sq, avoid).any():
                out.append(sq)
                break
    return out
