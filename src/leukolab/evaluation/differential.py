"""The differential count of a smear analysis: table, bar chart, annotated fields, and a check against truth.

``leukolab smear analyse`` writes one row per classified cell (``cells.csv``:
image, box, detector score, predicted ``type``, one ``p_<class>`` column per
class). From those rows :func:`differential_table` counts each type per image
and over the whole input (the lab's differential count), with the crops the
classifier called ``background`` (false detections) counted in their own column
and left out of the percentages. :func:`match_truth` compares the cells with
annotated white cells (BCCD's ``wbc_types.csv``, or the ``boxes.csv`` of
``leukolab synth smears``): detection recall, typing accuracy of the detected
cells and the per-field differential error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from leukolab.data.background import BACKGROUND
from leukolab.data.crops import WHITE_CELL_NAMES, class_key
from leukolab.errors import LeukolabError
from leukolab.evaluation.detection import draw_boxes
from leukolab.evaluation.metrics import classification_metrics

__all__ = [
    "BACKGROUND",
    "TOTAL",
    "TruthComparison",
    "cell_types",
    "differential_table",
    "draw_cells",
    "match_truth",
    "plot_differential",
    "truth_table",
]

#: the ``image`` of the differential table's row over all fields
TOTAL = "TOTAL"


def cell_types(classes: Sequence[str]) -> list[str]:
    """The cell types of a classifier's ``classes``: all but :data:`BACKGROUND`."""
    return [c for c in classes if c != BACKGROUND]


def differential_table(cells: pd.DataFrame, images: Sequence[str], classes: Sequence[str]) -> pd.DataFrame:
    """Counts and percentages of each cell type per image (in ``images`` order) and a :data:`TOTAL` row.

    Columns: ``image``, ``cells`` (typed cells, background excluded), ``background`` (crops classified as
    background), one count column per type and one ``<type>_pct`` column per type (percent of ``cells``;
    empty for an image without cells). ``cells`` needs the columns ``image`` and ``type``.
    """
    types = cell_types(classes)
    counts = pd.crosstab(cells["image"], cells["type"]) if len(cells) else pd.DataFrame()
    counts = counts.reindex(index=list(images), columns=[*types, BACKGROUND], fill_value=0).fillna(0).astype(int)
    counts.loc[TOTAL] = counts.sum(axis=0)
    table = pd.DataFrame({"image": counts.index, "cells": counts[types].sum(axis=1).to_numpy(),
                          BACKGROUND: counts[BACKGROUND].to_numpy()})
    for t in types:
        table[t] = counts[t].to_numpy()
    n = table["cells"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for t in types:
            table[f"{t}_pct"] = np.where(n > 0, np.round(100.0 * table[t].to_numpy() / n, 2), np.nan)
    return table.reset_index(drop=True)


def plot_differential(table: pd.DataFrame, classes: Sequence[str], path: Path | str) -> Path:
    """Bar chart of the :data:`TOTAL` row of a :func:`differential_table` (percent of typed cells, with
    counts on the bars); written atomically and listed in the folder's manifest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leukolab.evaluation.detection import PALETTE
    from leukolab.evaluation.plots import save_figure

    types = cell_types(classes)
    total = table.loc[table["image"] == TOTAL].iloc[0]
    pct = [0.0 if pd.isna(total[f"{t}_pct"]) else float(total[f"{t}_pct"]) for t in types]
    colours = [tuple(v / 255 for v in PALETTE[list(classes).index(t) % len(PALETTE)]) for t in types]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(types), 3.6))
    bars = ax.bar(types, pct, color=colours)
    for bar, t in zip(bars, types, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, str(int(total[t])), ha="center",
                fontsize=9)
    ax.set(ylabel="% of white cells", ylim=(0, max(100.0, max(pct, default=0) + 8)))
    n_fields = int((table["image"] != TOTAL).sum())
    ax.set_title(f"differential: {int(total['cells'])} cells in {n_fields} field(s); "
                 f"{int(total[BACKGROUND])} background crop(s) left out", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return save_figure(fig, path, "differential count over all fields", overwrite=False)


def draw_cells(
    image: np.ndarray | Image.Image, boxes: np.ndarray, type_index: np.ndarray, classes: Sequence[str],
    probability: np.ndarray,
) -> Image.Image:
    """The field with each cell's box in its type's colour, labelled ``type probability``."""
    return draw_boxes(image, boxes, type_index, list(classes), probability)


# --------------------------------------------------------------------------- comparison with annotated cells
def _first(frame: pd.DataFrame, names: Sequence[str], what: str) -> str:
    for n in names:
        if n in frame.columns:
            return n
    raise LeukolabError(f"truth table: no {what} column (expected one of {', '.join(names)}); "
                        f"it has {', '.join(map(str, frame.columns))}")


def truth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Annotated white cells in one form: ``image`` (file name), ``x1, y1, x2, y2``, ``type`` (lower case,
    ``""`` where unknown / ambiguous).

    Reads BCCD's ``wbc_types.csv`` (``image, xmin, ymin, xmax, ymax, wbc_type_if_unambiguous``) and the
    ``boxes.csv`` of ``leukolab synth smears`` (``image, label, x1, y1, x2, y2, wbc_type``; rows whose
    ``label`` is not a white-cell name are left out).
    """
    frame = frame.copy()
    if "label" in frame.columns:
        frame = frame[[class_key(v) in WHITE_CELL_NAMES for v in frame["label"].astype(str)]]
    coords = [_first(frame, (a, b), a) for a, b in (("x1", "xmin"), ("y1", "ymin"), ("x2", "xmax"), ("y2", "ymax"))]
    type_col = _first(frame, ("type", "wbc_type_if_unambiguous", "wbc_type"), "white-cell type")
    image_col = _first(frame, ("image", "filename", "file"), "image")
    types = frame[type_col].fillna("").astype(str).str.strip().str.lower()
    out = pd.DataFrame({"image": [Path(str(v)).name for v in frame[image_col]]})
    for name, col in zip(("x1", "y1", "x2", "y2"), coords, strict=True):
        out[name] = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
    out["type"] = types.to_numpy()
    if out[["x1", "y1", "x2", "y2"]].isna().any().any():
        raise LeukolabError("truth table: a box coordinate is missing or not a number")
    return out.reset_index(drop=True)


@dataclass
class TruthComparison:
    """What :func:`match_truth` found.

    ``metrics``: JSON-ready numbers (see :func:`match_truth`); ``matches``: one row per annotated white
    cell (its box, ``true_type``, ``detected``, ``iou``, ``predicted_type``); ``fields``: one row per
    field (true and predicted counts, ``count_error``, ``differential_error``).
    """

    metrics: dict[str, Any]
    matches: pd.DataFrame
    fields: pd.DataFrame


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a`` (N, 4) and ``b`` (M, 4) (torchvision.ops.box_iou, on numpy)."""
    import torch
    from torchvision.ops import box_iou

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).numpy()


def _greedy(iou: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """For each truth box (rows), the matched detection (column) or -1: detections in ``order`` (best score
    first) each take the free truth box they overlap most, if by at least ``threshold`` (as COCO matches)."""
    match = np.full(iou.shape[0], -1)
    for j in order:
        if not iou.shape[0]:
            break
        cand = np.where(match < 0, iou[:, j], -1.0)
        i = int(np.argmax(cand))
        if cand[i] >= threshold:
            match[i] = j
    return match


def _proportions(types: Sequence[str], names: Sequence[str]) -> np.ndarray | None:
    counts = np.array([sum(t == n for t in types) for n in names], dtype=np.float64)
    return counts / counts.sum() if counts.sum() else None


def match_truth(
    cells: pd.DataFrame, truth: pd.DataFrame, fields: Sequence[str] | None = None, iou: float = 0.5
) -> TruthComparison:
    """Compare classified cells (rows of ``cells.csv``) with annotated white cells (:func:`truth_table`).

    Fields are matched by file name; ``fields`` (default: the images of ``cells``) are the analysed ones:
    truth rows of other images are ignored, and an analysed field without truth rows counts as holding no
    white cell. In each field, detections (best detector score first) are matched one to one to the
    annotated box they overlap most with IoU >= ``iou``.

    ``metrics`` holds: ``detection_recall`` (annotated cells with a known type that a detection found;
    ``detection_recall_all`` over every annotated cell), ``typing_accuracy`` / ``typing_balanced_accuracy``
    of the found typed cells (a crop called background counts as wrong; the full
    :func:`~leukolab.evaluation.metrics.classification_metrics` under ``typing``), ``end_to_end_recall``
    (typed cells found *and* typed right), ``false_detections`` (detections matching no annotated cell,
    and how many of them the classifier called background), and per field -- over the fields whose cells
    all have a known type and hold at least one -- ``differential_error`` (mean total-variation distance
    between the predicted and the true type proportions, 0 = same differential, 1 = disjoint; a field
    where no typed cell was found counts 1) and ``count_error`` (mean |predicted - true| cells);
    ``pooled_differential_error``: the same distance between the differentials summed over those fields.
    """
    truth = truth_table(truth) if "type" not in truth.columns or "x1" not in truth.columns else truth
    cells = cells.copy()
    cells["field"] = [Path(str(v)).name for v in cells["image"]]
    names = list(dict.fromkeys(Path(str(v)).name for v in (cells["image"] if fields is None else fields)))
    truth = truth[truth["image"].isin(names)].reset_index(drop=True)
    known = sorted({t for t in truth["type"] if t})
    predicted = sorted({t for t in cells["type"].astype(str)} - {BACKGROUND})
    type_names = sorted(set(known) | set(predicted))

    match_rows, field_rows = [], []
    false_det = false_bg = 0
    for name in names:
        t = truth[truth["image"] == name]
        c = cells[cells["field"] == name]
        tb, cb = t[["x1", "y1", "x2", "y2"]].to_numpy(float), c[["x1", "y1", "x2", "y2"]].to_numpy(float)
        ious = _iou(tb, cb)
        score = c["detector_score"].to_numpy(float) if "detector_score" in c.columns else np.zeros(len(c))
        match = _greedy(ious, np.argsort(-score, kind="stable"), iou)
        ctypes = c["type"].astype(str).to_numpy()
        for k, row in enumerate(t.itertuples(index=False)):
            j = match[k]
            match_rows.append({"image": name, "x1": row.x1, "y1": row.y1, "x2": row.x2, "y2": row.y2,
                               "true_type": row.type, "detected": j >= 0,
                               "iou": round(float(ious[k, j]), 4) if j >= 0 else np.nan,
                               "predicted_type": ctypes[j] if j >= 0 else ""})
        unmatched = np.setdiff1d(np.arange(len(c)), match[match >= 0])
        false_det += len(unmatched)
        false_bg += int((ctypes[unmatched] == BACKGROUND).sum())
        pred_types = [x for x in ctypes if x != BACKGROUND]
        all_typed = len(t) > 0 and all(t["type"] != "")
        row: dict[str, Any] = {"image": name, "true_cells": len(t), "typed_cells": int((t["type"] != "").sum()),
                               "predicted_cells": len(pred_types), "background": int((ctypes == BACKGROUND).sum()),
                               "count_error": abs(len(pred_types) - len(t)), "differential_error": np.nan}
        if all_typed:
            p, q = _proportions(pred_types, type_names), _proportions(list(t["type"]), type_names)
            row["differential_error"] = 1.0 if p is None else round(0.5 * float(np.abs(p - q).sum()), 4)
        field_rows.append(row)

    matches = pd.DataFrame(match_rows, columns=["image", "x1", "y1", "x2", "y2", "true_type", "detected", "iou",
                                                "predicted_type"])
    per_field = pd.DataFrame(field_rows, columns=["image", "true_cells", "typed_cells", "predicted_cells",
                                                  "background", "count_error", "differential_error"])
    typed = matches[matches["true_type"] != ""]
    found = typed[typed["detected"]]
    metrics: dict[str, Any] = {
        "fields": len(names), "fields_without_truth_rows": int((per_field["true_cells"] == 0).sum()),
        "annotated_cells": len(matches), "typed_cells": len(typed), "detections": len(cells),
        "iou_threshold": iou,
        "detection_recall": float(found.shape[0] / len(typed)) if len(typed) else None,
        "detection_recall_all": float(matches["detected"].mean()) if len(matches) else None,
        "false_detections": false_det, "false_detections_called_background": false_bg,
        "found_typed_called_background": int((found["predicted_type"] == BACKGROUND).sum()),
    }
    if len(found):
        labels = sorted(set(type_names) | {BACKGROUND})
        code = {n: i for i, n in enumerate(labels)}
        m = classification_metrics([code[v] for v in found["true_type"]],
                                   [code.get(v, code[BACKGROUND]) for v in found["predicted_type"]], labels)
        metrics.update(typing_accuracy=m["accuracy"], typing_balanced_accuracy=m["balanced_accuracy"], typing=m)
        metrics["end_to_end_recall"] = float((found["predicted_type"] == found["true_type"]).sum() / len(typed))
    else:
        metrics.update(typing_accuracy=None, typing_balanced_accuracy=None, end_to_end_recall=0.0 if len(typed)
                       else None)
    scored = per_field[per_field["differential_error"].notna()]
    metrics["differential_fields"] = len(scored)
    metrics["differential_error"] = float(scored["differential_error"].mean()) if len(scored) else None
    metrics["count_error"] = float(per_field["count_error"].mean()) if len(per_field) else None
    if len(scored):
        in_scored = set(scored["image"])
        p = _proportions([x for x, f in zip(cells["type"].astype(str), cells["field"], strict=True)
                          if f in in_scored and x != BACKGROUND], type_names)
        q = _proportions([x for x, f in zip(truth["type"], truth["image"], strict=True) if f in in_scored],
                         type_names)
        metrics["pooled_differential_error"] = 1.0 if p is None or q is None else round(
            0.5 * float(np.abs(p - q).sum()), 4)
    else:
        metrics["pooled_differential_error"] = None
    return TruthComparison(metrics, matches, per_field)
