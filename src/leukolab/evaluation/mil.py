"""Patient-level scores, cross-validation tables and attention galleries of the MIL task.

* :func:`mil_metrics` - everything in ``metrics.json``: the one classification
  scorer (:func:`leukolab.evaluation.metrics.classification_metrics`) on the
  thresholded probabilities, plus scikit-learn's ROC AUC on the probabilities,
  and ``macro_f1`` (the same number as ``f1_macro``; the issue's name);
* :func:`mil_scorer` - the validation scores the MIL objective logs;
* :func:`cv_table` - mean (± std) per method of a cross-validation's fold results;
* :func:`attention_frame` / :func:`plot_attention_gallery` - per patient, the
  weight of every cell and a picture of the most and least attended ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score

from leukolab.data.dataset import load_rgb
from leukolab.data.mil import CLASS_NAMES
from leukolab.evaluation.manifest import record
from leukolab.evaluation.metrics import classification_metrics
from leukolab.evaluation.tables import mean_std
from leukolab.utils.files import atomic_write

__all__ = [
    "MIL_METRICS",
    "attention_frame",
    "cv_table",
    "mil_metrics",
    "mil_scorer",
    "plot_attention_gallery",
    "roc_auc",
]

#: the headline patient-level scores, in table order
MIL_METRICS = ("balanced_accuracy", "accuracy", "roc_auc", "macro_f1")


def roc_auc(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``prob`` (of label 1); NaN when ``y_true`` holds one class only."""
    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(prob, dtype=np.float64)))


def mil_metrics(
    y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Scores of tumoral-probabilities ``prob`` against labels (0 reactive, 1 tumoral).

    :func:`~leukolab.evaluation.metrics.classification_metrics` of ``prob >= threshold``
    (accuracy, balanced accuracy, macro F1, per-class scores, confusion matrix with
    rows = true class), plus ``roc_auc``, ``macro_f1`` and ``threshold``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    out = classification_metrics(y, (p >= threshold).astype(np.int64), list(CLASS_NAMES))
    out["macro_f1"] = out["f1_macro"]
    out["roc_auc"] = roc_auc(y, p)
    out["threshold"] = float(threshold)
    return out


def mil_scorer(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """``balanced_accuracy``, ``accuracy`` and ``roc_auc`` of a validation pass (logged every epoch).

    The same definitions as :func:`mil_metrics` (balanced accuracy: the mean recall
    of the classes present), computed directly: scikit-learn's argument checks
    cost more than a whole MIL training epoch on cached embeddings.
    """
    y = np.asarray(y_true, dtype=np.int64)
    pred = (np.asarray(prob) >= 0.5).astype(np.int64)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = roc_auc(y, prob)
    return {"balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"), "roc_auc": auc}


def cv_table(results: pd.DataFrame, by: str = "method", metrics: Sequence[str] = MIL_METRICS) -> pd.DataFrame:
    """One row per ``by`` group: ``"0.853 ± 0.041"`` per metric (sample std over folds and repeats) and ``n``.

    ``results`` has one row per (method, repeat, fold) with the metric columns.
    Rows are sorted by mean balanced accuracy, best first.
    """
    stats = mean_std(results, by, metrics)
    stats = stats.sort_values("balanced_accuracy_mean", ascending=False, kind="stable") \
        if "balanced_accuracy_mean" in stats else stats
    table = pd.DataFrame({by: stats[by]})
    for m in metrics:
        if f"{m}_mean" in stats:
            table[m] = [f"{a:.3f} ± {s:.3f}" if np.isfinite(s) else f"{a:.3f}"
                        for a, s in zip(stats[f"{m}_mean"], stats[f"{m}_std"], strict=True)]
    table["n"] = stats["n"].to_numpy()
    return table.reset_index(drop=True)


def attention_frame(patient: str, cells: Sequence[Path | str], weights: np.ndarray) -> pd.DataFrame:
    """One row per cell of a patient: ``patient, cell, weight, rank`` (rank 1 = most attended)."""
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-w, kind="stable")
    rank = np.empty(len(w), dtype=np.int64)
    rank[order] = np.arange(1, len(w) + 1)
    return pd.DataFrame({"patient": patient, "cell": [Path(c).name for c in cells], "weight": w, "rank": rank})


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def plot_attention_gallery(
    cells: Sequence[Path | str], weights: np.ndarray, path: Path | str, title: str, k: int = 8, tile: int = 96
) -> Path:
    """The ``k`` most (top row) and ``k`` least (bottom row) attended cells of a bag, each under its weight.

    A bag of at most ``k`` cells shows every cell once, most attended first. The
    picture is composed with Pillow (matplotlib takes seconds per figure, and a
    cohort has a gallery per patient), written atomically and recorded in its
    folder's manifest (the HTML report shows it).
    """
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-w, kind="stable")
    k = max(1, int(k))
    rows = [("most attended", order[:k])]
    if len(order) > k:
        rows.append(("least attended", order[::-1][:k][::-1]))
    cols = max(len(idx) for _, idx in rows)
    label_w, head, cap = 22, 26, 18
    canvas = Image.new("RGB", (label_w + cols * (tile + 4), head + len(rows) * (tile + cap + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black", font=_font(14))
    small = _font(12)
    for r, (label, idx) in enumerate(rows):
        top = head + r * (tile + cap + 6)
        side = Image.new("RGB", (tile + cap, label_w), "white")
        ImageDraw.Draw(side).text((2, 4), label, fill="dimgray", font=small)
        canvas.paste(side.rotate(90, expand=True), (0, top))
        for c, j in enumerate(idx):
            left = label_w + c * (tile + 4)
            draw.text((left + 2, top), f"{w[int(j)]:.3f}", fill="black", font=small)
            cell = load_rgb(Path(cells[int(j)])).resize((tile, tile), Image.BILINEAR)
            canvas.paste(cell, (left, top + cap))
    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"), overwrite=True)
    record(path.parent, path.name, "figure", title)
    return path
