"""Plots people would rather look at than read: confusion matrix, training curves.

:func:`save_figure` is the one way a figure reaches the disk: written atomically
and listed in the folder's artefact manifest (``artefacts.json``), so that
``leukolab report`` shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from leukolab.evaluation.manifest import record
from leukolab.utils.files import atomic_write

__all__ = ["plot_confusion_matrix", "plot_curves", "save_figure"]


def save_figure(fig: Figure, path: Path | str, title: str, *, dpi: int = 120, overwrite: bool = True) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix), close it, and record it
    (kind ``figure``) in the folder's manifest.

    Figures are drawn from data that is kept (history.csv, metrics.json ...), so by
    default a figure is redrawn in place (e.g. the curves after a resumed run);
    ``overwrite=False`` refuses an existing file instead. Returns ``path``.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi), overwrite=overwrite)
    finally:
        plt.close(fig)
    record(path.parent, path.name, "figure", title)
    return path


def plot_confusion_matrix(
    cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: Path | str
) -> Path:
    """Counts (left) and row-normalised recall (right), one PNG (recorded in the folder's manifest)."""
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    n = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * n, 1.5 + 0.75 * n), constrained_layout=True)
    for ax, data, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=data.max() if data.max() > 0 else 1)
        ax.set_title(title)
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        thresh = data.max() / 2 if data.max() > 0 else 0.5
        for i in range(n):
            for j in range(n):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center",
                        color="white" if data[i, j] > thresh else "black", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path, "confusion matrix")


def plot_curves(history: pd.DataFrame, path: Path | str, title: str = "") -> Path:
    """Loss (left) and every other per-epoch metric (right) against the epoch (recorded in the manifest)."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    for col in history.columns:
        if col in {"epoch", "lr", "epoch_time_s", "trainable_params", "trainable_share"} \
                or not pd.api.types.is_numeric_dtype(history[col]):  # text columns (pandas 3 strings) too
            continue
        ax = ax_loss if "loss" in col else ax_metric
        ax.plot(x, history[col], marker="o", ms=3, label=col)
    for ax, name in ((ax_loss, "loss"), (ax_metric, "metric")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, "training curves")
