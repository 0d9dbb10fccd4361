"""Background crops for ``leukolab train --background DIR`` (``leukolab smear mine-background``).

:func:`mine_background` writes crops of what is *not* a white cell -- detections
of a detector run that overlap no annotated white cell, and random squares away
from the annotated white cells -- cut with ``smear analyse``'s geometry, so the
classifier of a smear pipeline learns to reject false detections.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from leukolab.data.crops import DEFAULT_MARGIN, crop_square, field_fill, random_squares, square_around, white_cell_class
from leukolab.data.dataset import load_rgb
from leukolab.errors import LeukolabError
from leukolab.evaluation.tables import write_table
from leukolab.models.detection_infer import predict_field
from leukolab.pipelines.detect import _scale
from leukolab.pipelines.smear import SmearOptions, load_smear_detector
from leukolab.training.loop import pick_device
from leukolab.utils.files import atomic_folder, write_bytes

__all__ = ["BACKGROUND_IOU", "mine_background"]

#: a detection overlapping an annotated white cell by less than this IoU is background
BACKGROUND_IOU = 0.1


def mine_background(
    data: Path | str, detector: Path | str, out: Path | str, per_field: int = 4, seed: int = 0,
    score: float = 0.05, margin: float = DEFAULT_MARGIN, pad: str = "reflect", cell_class: str | None = None,
    progress: bool = True,
) -> Path:
    """Write background crops of the fields of a detection data set into the new folder ``out``.

    Per field, at most ``per_field`` crops: up to half of them (rounded up) from detections of any class
    scoring at least ``score`` that overlap every annotated white cell by IoU < 0.1 (the highest-scoring
    first, near-duplicates removed by class-agnostic NMS), the rest random squares of the data's median
    white-cell size lying clear of every white-cell box. Crops use ``smear analyse``'s geometry (square,
    ``margin``, ``pad``). ``out`` holds the crops (JPEG) and ``crops.csv``: file, image, kind
    (``detection`` / ``random``), detector class and score, the inner box and the crop square.
    """
    from torchvision.ops import box_iou, nms

    from leukolab.data.detection import read_detection
    from leukolab.utils.progress import progress as bar

    if per_field < 1:
        raise LeukolabError(f"--per-field {per_field}: expected at least 1")
    SmearOptions(score=score, margin=margin, pad=pad).check()
    ds = read_detection(data)
    wbc = ds.classes[white_cell_class(ds.classes, cell_class)]
    sides = [max(b[2] - b[0], b[3] - b[1]) for it in ds.items for b, lab in zip(it.boxes, it.labels, strict=True)
             if lab == wbc]
    if not sides:
        raise LeukolabError(f"{data}: no {wbc!r} boxes; expected annotated white cells to stay clear of")
    side = max(1, round(float(np.median(sides))))
    det, meta = load_smear_detector(detector, pick_device("auto"))
    classes = list(meta["classes"])
    stems = [it.image.stem for it in ds.items]
    unique = len(set(stems)) == len(stems)

    def fill(root: Path) -> None:
        rows = []
        for i, item in enumerate(bar(ds.items, "background crops", progress)):
            rng = np.random.default_rng([seed, i])
            image = np.asarray(load_rgb(item.image))
            colour = field_fill(image)
            wbcs = np.array([b for b, lab in zip(item.boxes, item.labels, strict=True) if lab == wbc]).reshape(-1, 4)
            pred = predict_field(det, image, _scale(meta, image, None), score)
            boxes = torch.as_tensor(pred.boxes, dtype=torch.float64)
            far = (box_iou(boxes, torch.as_tensor(wbcs, dtype=torch.float64)).amax(1) < BACKGROUND_IOU
                   if len(wbcs) and len(boxes) else torch.ones(len(boxes), dtype=torch.bool))
            idx = torch.nonzero(far).flatten()
            keep = idx[nms(boxes[idx], torch.as_tensor(pred.scores[idx.numpy()], dtype=torch.float64), 0.5)]
            picked = [("detection", pred.boxes[k], classes[int(pred.labels[k])], float(pred.scores[k]))
                      for k in keep.numpy()[: math.ceil(per_field / 2)]]
            picked += [("random", np.array(sq, dtype=np.float64), "", np.nan) for sq in random_squares(
                item.width, item.height, side, wbcs, per_field - len(picked), rng)]
            prefix = item.image.stem if unique else f"{i:05d}_{item.image.stem}"
            for k, (kind, box, cls, s) in enumerate(picked):
                sq = square_around(box, margin)
                name = f"{prefix}_{kind[:3]}{k:02d}.jpg"
                buf = io.BytesIO()
                Image.fromarray(crop_square(image, sq, pad, colour)).save(buf, format="JPEG", quality=95)
                write_bytes(root / name, buf.getvalue())
                rows.append({"file": name, "image": str(item.image), "kind": kind, "detector_class": cls,
                             "score": round(s, 4) if s == s else np.nan,
                             **{c: round(float(v), 1) for c, v in zip(("x1", "y1", "x2", "y2"), box, strict=True)},
                             **dict(zip(("crop_x1", "crop_y1", "crop_x2", "crop_y2"), sq, strict=True))})
        cols = ["file", "image", "kind", "detector_class", "score", "x1", "y1", "x2", "y2", "crop_x1", "crop_y1",
                "crop_x2", "crop_y2"]
        write_table(pd.DataFrame(rows, columns=cols), root / "crops.csv", "background crops: where each came from")

    return atomic_folder(out, fill)
