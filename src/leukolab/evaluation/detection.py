"""COCO-style detection metrics (pycocotools) and the figures of a detection evaluation.

:func:`coco_metrics` runs the reference COCO evaluator (``pycocotools.cocoeval``,
the code every COCO number is computed with) over in-memory ground truth and
predictions, and reads from its accumulated arrays: AP per class at IoU 0.5
and averaged over IoU 0.5:0.95 (101-point interpolation), their means over the
classes that have ground truth (``map50``, ``map50_95``), precision / recall /
TP / FP / FN at one score threshold from the evaluator's own IoU-0.5 matching,
and the precision-recall curve per class. Boxes are ``x1, y1, x2, y2`` pixels.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from leukolab.utils.files import atomic_write

__all__ = ["DetectionMetrics", "GroundTruth", "Prediction", "coco_metrics", "draw_boxes", "plot_pr_curve"]


@dataclass
class GroundTruth:
    """The boxes of one image: ``boxes`` (N, 4) and class indices ``labels`` (N,)."""

    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class Prediction:
    """The detections of one image: ``boxes`` (M, 4), ``scores`` (M,) and class indices ``labels`` (M,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class DetectionMetrics:
    """What :func:`coco_metrics` measured; :meth:`to_dict` is the ``metrics.json`` content."""

    classes: list[str]
    ap50: dict[str, float | None]
    ap50_95: dict[str, float | None]
    map50: float
    map50_95: float
    score_threshold: float
    precision: dict[str, float | None]
    recall: dict[str, float | None]
    counts: dict[str, Any]
    pr_curves: dict[str, np.ndarray] = field(default_factory=dict)  # class -> precision at RECALL_GRID

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (no PR curves)."""
        return {
            "classes": list(self.classes),
            "map50": self.map50,
            "map50_95": self.map50_95,
            "ap50": dict(self.ap50),
            "ap50_95": dict(self.ap50_95),
            "score_threshold": self.score_threshold,
            "precision": dict(self.precision),
            "recall": dict(self.recall),
            "counts": self.counts,
        }


RECALL_GRID = np.linspace(0.0, 1.0, 101)
"""The recall points of COCO's interpolated precision (pycocotools ``recThrs``)."""


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else 0.0


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def coco_metrics(
    gts: Sequence[GroundTruth],
    preds: Sequence[Prediction],
    classes: Sequence[str],
    score_threshold: float | Sequence[float] = 0.3,
    max_dets: int = 100,
) -> DetectionMetrics:
    """COCO-style metrics of ``preds`` against ``gts`` (one entry per image, in the same order).

    ``score_threshold`` (one value, or one per class) only affects precision,
    recall and the counts; AP uses every detection (the ``max_dets`` best per image).
    A class without ground truth has AP ``None`` and is left out of the means.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground truths but {len(preds)} predictions")
    k = len(classes)
    thresholds = np.broadcast_to(np.asarray(score_threshold, dtype=np.float64), (k,))
    images, anns, dets = [], [], []
    for i, (gt, pred) in enumerate(zip(gts, preds, strict=True)):
        images.append({"id": i + 1})
        for box, label in zip(np.asarray(gt.boxes).reshape(-1, 4), np.asarray(gt.labels).reshape(-1), strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        boxes = np.asarray(pred.boxes).reshape(-1, 4)
        for box, score, label in zip(boxes, np.asarray(pred.scores).reshape(-1), np.asarray(pred.labels).reshape(-1),
                                     strict=True):
            dets.append({"image_id": i + 1, "category_id": int(label) + 1, "score": float(score),
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    n_gt = np.bincount([a["category_id"] - 1 for a in anns], minlength=k)[:k]
    ap50: dict[str, float | None] = {c: (0.0 if n_gt[j] else None) for j, c in enumerate(classes)}
    ap50_95 = dict(ap50)
    curves = {c: np.zeros_like(RECALL_GRID) for j, c in enumerate(classes) if n_gt[j]}
    tp, fp = np.zeros(k, dtype=int), np.zeros(k, dtype=int)
    n_pred = np.zeros(k, dtype=int)
    if dets and anns:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "annotations": anns,
                               "categories": [{"id": j + 1, "name": c} for j, c in enumerate(classes)]}
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.areaRng = [[0.0, 1e12]]
            ev.params.areaRngLbl = ["all"]
            ev.params.maxDets = [max_dets]
            ev.evaluate()
            ev.accumulate()
        precision = ev.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M maxDets)
        for j, c in enumerate(classes):
            if not n_gt[j]:
                continue
            p = precision[:, :, j, 0, 0]
            per_iou = [float(np.mean(np.where(row > -1, row, 0.0))) for row in p]
            ap50[c], ap50_95[c] = per_iou[0], float(np.mean(per_iou))
            curves[c] = np.where(p[0] > -1, p[0], 0.0)
        for e in ev.evalImgs:  # the evaluator's own IoU-0.5 matching, one entry per (class, image)
            if e is None:
                continue
            j = e["category_id"] - 1
            keep = (np.asarray(e["dtScores"]) >= thresholds[j]) & ~np.asarray(e["dtIgnore"][0], dtype=bool)
            matched = np.asarray(e["dtMatches"][0]) > 0
            tp[j] += int((keep & matched).sum())
            fp[j] += int((keep & ~matched).sum())
            n_pred[j] += int(keep.sum())
    elif dets:  # predictions but no ground truth at all: every kept detection is a false positive
        for d in dets:
            j = d["category_id"] - 1
            if d["score"] >= thresholds[j]:
                fp[j] += 1
                n_pred[j] += 1
    fn = n_gt - tp
    prec = {c: _ratio(int(tp[j]), int(tp[j] + fp[j])) for j, c in enumerate(classes)}
    rec = {c: _ratio(int(tp[j]), int(n_gt[j])) for j, c in enumerate(classes)}
    prec["all"] = _ratio(int(tp.sum()), int((tp + fp).sum()))
    rec["all"] = _ratio(int(tp.sum()), int(n_gt.sum()))
    counts = {
        "images": len(gts),
        "ground_truth": {c: int(n_gt[j]) for j, c in enumerate(classes)},
        "predicted": {c: int(n_pred[j]) for j, c in enumerate(classes)},
        "true_positives": {c: int(tp[j]) for j, c in enumerate(classes)},
        "false_positives": {c: int(fp[j]) for j, c in enumerate(classes)},
        "false_negatives": {c: int(fn[j]) for j, c in enumerate(classes)},
    }
    thr = float(thresholds[0]) if np.all(thresholds == thresholds[0]) else [float(t) for t in thresholds]
    return DetectionMetrics(
        list(classes), ap50, ap50_95, _mean(list(ap50.values())), _mean(list(ap50_95.values())),
        thr, prec, rec, counts, curves,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

#: box colours per class index (RGB), cycled
PALETTE = ((30, 90, 230), (220, 40, 40), (20, 160, 60), (230, 140, 0), (150, 60, 200), (0, 170, 190))


def plot_pr_curve(curve: np.ndarray, path: Path | str, title: str, ap50: float | None = None) -> Path:
    """Precision over recall (COCO's interpolated curve at IoU 0.5) as a PNG, listed in the folder's manifest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leukolab.evaluation.plots import save_figure

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(RECALL_GRID, curve, lw=2)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title(title + ("" if ap50 is None or math.isnan(ap50) else f"  (AP50 {ap50:.3f})"), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, title)


def draw_boxes(
    image: np.ndarray | Image.Image,
    boxes: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    scores: np.ndarray | None = None,
    width: int = 2,
) -> Image.Image:
    """A copy of ``image`` with the boxes drawn in their class colour (and the score when given)."""
    im = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    boxes, labels = np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1)
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        text = classes[int(label)] + ("" if scores is None else f" {float(scores[i]):.2f}")
        draw.text((x1 + 2, y1 + 1), text, fill=colour)
    return im


def save_comparison(
    image: np.ndarray, gt: GroundTruth, pred: Prediction, classes: Sequence[str], path: Path | str
) -> Path:
    """Ground truth (left) next to the predictions (right) of one field, as a PNG (a new file)."""
    left = draw_boxes(image, gt.boxes, gt.labels, classes)
    right = draw_boxes(image, pred.boxes, pred.labels, classes, pred.scores)
    canvas = Image.new("RGB", (left.width * 2 + 8, left.height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
