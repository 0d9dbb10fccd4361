"""Classification metrics a researcher can trust: the one function that scores predictions.

:func:`classification_metrics` is used by ``evaluate`` (a trained classifier on a
test set), by the validation step of the classification objective, by the kNN and
linear probes (:mod:`leukolab.evaluation.probe`) and, through the ``metrics.json``
that ``evaluate`` writes, by the label-efficiency experiment. Every number comes
from scikit-learn; nothing is re-derived by hand.

Averaging convention: a test set may hold only some of the model's classes. Macro
scores (precision, recall, F1, and balanced accuracy, which is the macro recall)
average over the classes *present in* ``y_true``; a class that is absent there has
no recall to speak of, and a model that predicts it is already penalised through
the precision of nothing and the recall of the classes it took the images from.
Per-class scores and the confusion matrix cover every class of the model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import record
from leukolab.utils.files import write_text

__all__ = ["METRICS", "classification_metrics", "headline", "write_metrics"]

#: the scalar scores of every results table, in order (fractions in [0, 1])
METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
)


def _codes(y: Sequence[int] | np.ndarray, name: str, n_classes: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise LeukolabError(f"{name} must be a 1-D array of class codes, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LeukolabError(f"{name} must hold integer class codes 0..{n_classes - 1}, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise LeukolabError(f"{name} holds class codes outside 0..{n_classes - 1} (the model has {n_classes} classes)")
    return arr.astype(np.int64, copy=False)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Score predicted class codes against true ones (codes index ``class_names``).

    Returns a JSON-ready dict:

    * ``n``, and the :data:`METRICS`: ``accuracy``; ``balanced_accuracy``,
      ``precision_macro``, ``recall_macro``, ``f1_macro`` (macro over the classes
      present in ``y_true``; ill-defined scores count as 0); ``f1_weighted``
      (weighted by the support of those classes);
    * ``n_classes_present`` (classes in ``y_true``) and ``n_predicted_classes``
      (distinct classes in ``y_pred``: fewer than the model has flags a collapse);
    * ``per_class``: ``{name: {precision, recall, f1, support}}`` for every class;
    * ``confusion_matrix``: ``C x C`` counts over every class (rows: true);
    * ``class_names``.

    Raises :class:`LeukolabError` for arrays of different lengths, no samples, or
    codes outside ``0 .. len(class_names)-1``.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes == 0:
        raise LeukolabError("classification metrics need at least one class name")
    y_true = _codes(y_true, "y_true", n_classes)
    y_pred = _codes(y_pred, "y_pred", n_classes)
    if y_true.shape != y_pred.shape:
        raise LeukolabError(f"y_true and y_pred differ in length ({y_true.size} vs {y_pred.size})")
    if y_true.size == 0:
        raise LeukolabError("no samples to score (y_true is empty)")
    labels = list(range(n_classes))
    present = np.unique(y_true).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    _, _, wf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="weighted", zero_division=0)
    with warnings.catch_warnings():
        # a predicted class absent from y_true: sklearn warns, then (as we want) averages over y_true's classes
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "f1_macro": float(mf),
        "f1_weighted": float(wf),
        "precision_macro": float(mp),
        "recall_macro": float(mr),
        "n_classes_present": len(present),
        "n_predicted_classes": int(np.unique(y_pred).size),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": names,
    }


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The :data:`METRICS` of a :func:`classification_metrics` result (the row of a results table)."""
    return {k: float(metrics[k]) for k in METRICS}


def write_metrics(metrics: dict[str, Any], path: Path | str, title: str = "metrics") -> Path:
    """Write ``metrics`` as indented JSON to ``path`` (a new file, atomically) and list it in the
    folder's artefact manifest (kind ``metrics``). Returns ``path``."""
    path = Path(path)
    write_text(path, json.dumps(metrics, indent=2, default=str) + "\n")
    record(path.parent, path.name, "metrics", title)
    return path
