"""K-fold assignment for cross-validation: stratified, multilabel (iterative stratification) and grouped.

* Single label, no groups: :class:`sklearn.model_selection.StratifiedKFold` (shuffled, seeded).
* Single label with groups: :class:`sklearn.model_selection.StratifiedGroupKFold` (whole groups per fold).
* Multilabel: :class:`iterstrat.ml_stratifiers.MultilabelStratifiedKFold` (Sechidis et al. 2011 iterative
  stratification). It has no groups; with groups, each group becomes one sample whose label vector is the union
  of its members' labels, the groups are stratified, and every image takes its group's fold. Folds then balance
  groups rather than images, which is exact for the usual groups (single images and small duplicate clusters)
  and approximate for very unequal groups (tests pin the label shares within a tolerance).

Every function returns one fold index (0..K-1) per item and depends only on its inputs and ``seed``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from leukolab.errors import LeukolabError

__all__ = ["check_fold_count", "multilabel_folds", "parse_label_set", "stratified_folds"]

LABEL_SEPARATOR = ";"


def parse_label_set(text: object) -> list[str]:
    """``"a;b"`` -> ``["a", "b"]`` (stripped, empty parts dropped, order kept, no repeats)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return []
    parts = [p.strip() for p in str(text).split(LABEL_SEPARATOR)]
    return list(dict.fromkeys(p for p in parts if p))


def check_fold_count(k: int, counts: dict[str, int], unit: str = "image") -> None:
    """Raise a :class:`LeukolabError` unless ``2 <= k <= min(counts)``.

    ``counts`` maps each class (or label) to the number of images (or groups, ``unit="group"``) holding it:
    every fold must be able to hold every class.
    """
    if k < 2:
        raise LeukolabError(f"folds {k}: expected at least 2")
    if not counts:
        raise LeukolabError("no labelled images to split into folds")
    name, smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if k > smallest:
        raise LeukolabError(
            f"folds {k} is larger than class {name!r}, which has only {smallest} {unit}(s); "
            f"expected at most {smallest} folds"
        )


def _group_codes(groups: Sequence[object]) -> np.ndarray:
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes


def stratified_folds(labels: Sequence[str], k: int, seed: int = 0, groups: Sequence[object] | None = None
                     ) -> np.ndarray:
    """Fold of each image: class shares kept in every fold; with ``groups``, each group in one fold.

    Raises:
        LeukolabError: ``k < 2``, no images, ``k`` larger than the smallest class (counted in groups when
            grouped), or larger than the number of groups.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray([str(x) for x in labels])
    if groups is None:
        check_fold_count(k, dict(Counter(y.tolist())))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(y)), y)
    else:
        codes = _group_codes(groups)
        _check_groups(k, y.tolist(), codes)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(y)), y, codes)
    return _fold_column(len(y), splits)


def multilabel_folds(label_sets: Sequence[Sequence[str]], k: int, seed: int = 0,
                     groups: Sequence[object] | None = None) -> np.ndarray:
    """Fold of each image of a multilabel set by iterative stratification; with ``groups``, each group in one fold.

    Args:
        label_sets: the labels of each image (an image may have none).
        k: number of folds.
        seed: random seed (ties in the iterative stratification are broken at random).
        groups: optional group of each image.

    Raises:
        LeukolabError: ``k < 2``, no images or no labels, ``k`` larger than the rarest label's number of images
            (of groups when grouped), or larger than the number of groups.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    names = sorted({label for labels in label_sets for label in labels})
    if not names:
        raise LeukolabError("no labels to stratify; expected a 'labels' column like 'a;b'")
    index = {name: i for i, name in enumerate(names)}
    y = np.zeros((len(label_sets), len(names)), dtype=int)
    for row, labels in enumerate(label_sets):
        y[row, [index[label] for label in labels]] = 1
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    if groups is None:
        check_fold_count(k, {name: int(y[:, i].sum()) for i, name in enumerate(names)})
        return _fold_column(len(y), splitter.split(np.zeros(len(y)), y))
    codes = _group_codes(groups)
    n_groups = int(codes.max()) + 1
    group_y = np.zeros((n_groups, len(names)), dtype=int)
    np.maximum.at(group_y, codes, y)  # a group holds a label when any of its images does
    if k > n_groups:
        raise LeukolabError(f"folds {k} is larger than the number of groups ({n_groups})")
    check_fold_count(k, {name: int(group_y[:, i].sum()) for i, name in enumerate(names)}, unit="group")
    group_fold = _fold_column(n_groups, splitter.split(np.zeros(n_groups), group_y))
    return group_fold[codes]


def _check_groups(k: int, labels: list[str], codes: np.ndarray) -> None:
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if k >= 2 and n_groups and k > n_groups:
        raise LeukolabError(f"folds {k} is larger than the number of groups ({n_groups})")
    per_class = {c: len(set(codes[np.asarray(labels) == c].tolist())) for c in set(labels)}
    check_fold_count(k, per_class, unit="group")


def _fold_column(n: int, splits: object) -> np.ndarray:
    folds = np.full(n, -1, dtype=int)
    with warnings.catch_warnings():
        # checked above; sklearn would also warn about classes that cannot reach every fold
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splits):  # type: ignore[misc]
            folds[test] = fold
    return folds
