"""``leukolab smear crops``: the typed white cells of annotated smear fields as an ImageFolder test set.

Another lab's images are the honest test of a WBC classifier trained on one lab's crops. Annotated smear
fields (BCCD: a box and, where unambiguous, a type per white cell in ``wbc_types.csv``; ``leukolab synth
smears``: ``boxes.csv``) become such a test set here: each typed white cell is cut out as a square around
its box (:func:`~leukolab.data.crops.square_around`, ``margin`` of the box side on each side, mirrored at the
field's border) and written as ``OUT/<type>/<image stem>_<idx>.png`` (``idx``: the cell's place among the
field's annotated white cells). Boxes without an unambiguous type are skipped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukolab.data.crops import crop_square, square_around
from leukolab.data.dataset import load_rgb
from leukolab.data.readers import list_images
from leukolab.errors import LeukolabError
from leukolab.evaluation.differential import truth_table
from leukolab.evaluation.tables import write_table
from leukolab.utils.files import atomic_folder
from leukolab.utils.progress import progress as bar

__all__ = ["DEFAULT_CROP_MARGIN", "SmearCrops", "write_smear_crops"]

#: fraction of the box side added on each side (BCCD boxes are loose: 0.25 frames the cell like a PBC crop)
DEFAULT_CROP_MARGIN = 0.25


@dataclass
class SmearCrops:
    """What :func:`write_smear_crops` wrote: the folder, crops per type, and what it skipped."""

    folder: Path
    counts: dict[str, int] = field(default_factory=dict)
    untyped: int = 0
    missing_images: int = 0


def _read_truth(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise LeukolabError(f"--truth {path}: cannot read it as CSV ({exc.__class__.__name__}); expected a table "
                            "with image, box and type columns") from None
    return truth_table(frame)


def _images_by_name(data: Path) -> dict[str, Path]:
    if not data.is_dir():
        raise LeukolabError(f"{data} is not a folder; expected the folder of the annotated field images")
    found: dict[str, Path] = {}
    for p in list_images(data):
        found.setdefault(p.name, p)  # sorted: JPEGImages/x.jpg before a deeper copy
    return found


def write_smear_crops(
    data: Path | str, truth: Path | str, out: Path | str, margin: float = DEFAULT_CROP_MARGIN,
    progress: bool = True,
) -> SmearCrops:
    """Write the typed white cells of the fields under ``data`` listed in ``truth`` into the new folder ``out``.

    Args:
        data: folder holding the field images (searched recursively, matched by file name).
        truth: CSV of annotated white cells (:func:`~leukolab.evaluation.differential.truth_table` reads
            BCCD's ``wbc_types.csv`` and ``synth smears``' ``boxes.csv``).
        out: new folder: ``<type>/<stem>_<idx>.png`` per typed cell and ``crops.csv`` (where each came from).
        margin: fraction of the box's longer side added on each side of the square crop.

    Raises:
        LeukolabError: unreadable CSV, ``data`` not a folder, no listed image found under it, no typed cell,
            a bad margin, or an existing non-empty ``out``.
    """
    data, truth, out = Path(data), Path(truth), Path(out)
    square_around((0, 0, 1, 1), margin)  # checks the margin before any work
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeukolabError(f"{out} already exists and is not empty; refusing to overwrite it")
    table = _read_truth(truth)
    images = _images_by_name(data)
    table["idx"] = table.groupby("image").cumcount()
    present = table["image"].isin(images)
    if not present.any():
        raise LeukolabError(f"--truth {truth}: none of its {table['image'].nunique()} images is under {data}; "
                            "expected the folder of the annotated fields (e.g. BCCD's trainval)")
    typed = table[present & (table["type"] != "")]
    if typed.empty:
        raise LeukolabError(f"--truth {truth}: no white cell with an unambiguous type among the images under {data}")
    result = SmearCrops(folder=out, untyped=int((present & (table["type"] == "")).sum()),
                        missing_images=int(table.loc[~present, "image"].nunique()))

    def fill(root: Path) -> None:
        rows, counts = [], Counter()
        groups = list(typed.groupby("image", sort=True))
        for name, cells in bar(groups, "white-cell crops", progress):
            field_rgb = np.asarray(load_rgb(images[name]))
            for cell in cells.itertuples(index=False):
                sq = square_around((cell.x1, cell.y1, cell.x2, cell.y2), margin)
                file = f"{cell.type}/{Path(name).stem}_{cell.idx}.png"
                (root / cell.type).mkdir(exist_ok=True)
                Image.fromarray(crop_square(field_rgb, sq, "reflect")).save(root / file, format="PNG")
                counts[cell.type] += 1
                rows.append({"file": file, "image": name, "idx": cell.idx, "type": cell.type,
                             "x1": cell.x1, "y1": cell.y1, "x2": cell.x2, "y2": cell.y2,
                             "crop_x1": sq[0], "crop_y1": sq[1], "crop_x2": sq[2], "crop_y2": sq[3]})
        write_table(pd.DataFrame(rows), root / "crops.csv", "white-cell crops: field, box and square of each")
        result.counts = dict(sorted(counts.items()))

    atomic_folder(out, fill)
    return result
