"""Deterministic stratified splits and nested label-fraction subsets."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from leukolab.errors import LeukolabError


def _by_class(labels: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    return dict(sorted(groups.items()))


def stratified_split(
    labels: Sequence[str], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[int]]:
    """Split indices into ``train``/``val``/``test`` with the class ratios kept.

    Every class with at least three images gets at least one image in each
    split; the result depends only on ``labels`` and ``seed``.
    """
    for name, value in (("val fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise LeukolabError(f"{name} {value} is outside [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise LeukolabError(f"val + test fractions ({val_fraction} + {test_fraction}) leave no training images")
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for ci, (label, idx) in enumerate(_by_class(labels).items()):
        rng = np.random.default_rng([seed, ci, len(idx)])
        order = [idx[i] for i in rng.permutation(len(idx))]
        n = len(order)
        n_test = _share(n, test_fraction)
        n_val = _share(n - n_test, val_fraction / max(1e-9, 1 - test_fraction)) if val_fraction else 0
        if n - n_test - n_val < 1:
            raise LeukolabError(f"class {label!r} has {n} image(s); too few to split into train/val/test")
        out["test"] += order[:n_test]
        out["val"] += order[n_test : n_test + n_val]
        out["train"] += order[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def _share(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return max(1, round(n * fraction))


def label_fraction_subset(labels: Sequence[str], fraction: float, seed: int = 0) -> list[int]:
    """Indices of a stratified ``fraction`` of ``labels``, at least one per class.

    Subsets are nested: for the same seed, the 1 % subset is inside the 10 %
    subset, which is inside the 50 % one. Per class, ``max(1, floor(fraction * n))``
    images are kept (the convention of the WBC_100/50/10/1 tables).
    """
    check_fraction(fraction)
    keep: list[int] = []
    for ci, (_label, idx) in enumerate(_by_class(labels).items()):
        rng = np.random.default_rng([seed, 7919, ci, len(idx)])
        order = [idx[i] for i in rng.permutation(len(idx))]
        k = max(1, math.floor(round(fraction * len(idx), 6)))
        keep += order[:k]
    return sorted(keep)


def check_fraction(fraction: float) -> float:
    """``fraction`` if it lies in (0, 1], else a :class:`LeukolabError`."""
    if not 0.0 < fraction <= 1.0:
        raise LeukolabError(f"label fraction {fraction} is outside (0, 1]; expected e.g. 1, 0.5, 0.1 or 0.01")
    return fraction
