"""Classification metrics a researcher can trust (balanced accuracy, macro F1 ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted F1, macro precision/recall and per-class scores."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(range(len(class_names)))
    present = sorted(set(y_true.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # macro scores over the classes present in y_true (absent classes have no recall to speak of)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "f1_macro": float(mf),
        "f1_weighted": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "precision_macro": float(mp),
        "recall_macro": float(mr),
        "n_predicted_classes": len(set(y_pred.tolist())),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
