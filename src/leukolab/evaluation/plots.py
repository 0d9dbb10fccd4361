"""Plots people would rather look at than read: confusion matrix, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_confusion_matrix(cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    """Counts (left) and row-normalised recall (right), one PNG."""
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(history: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Loss (left) and every other per-epoch metric (right) against the epoch."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    for col in history.columns:
        if col in {"epoch", "lr", "epoch_time_s"} or not np.issubdtype(history[col].dtype, np.number):
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
