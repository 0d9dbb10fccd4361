"""Read a folds file (``path,label,fold`` CSV, written by ``leukolab split``) as one cross-validation split.

``leukolab train --folds-file F --fold K`` validates on fold ``K`` (it picks
``best.pt``) and trains on every other fold. Paths are absolute or relative to
the CSV's folder. A ``split`` column is optional: its ``test`` rows are the
run's test split and take no part in the folds (their ``fold`` may be blank);
without one the run has no test split (``leukolab evaluate RUN --data DIR``).
Multilabel ``labels`` columns are not used: a classifier trains on ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leukolab.data.readers import LabelledImages, read_image_table
from leukolab.errors import LeukolabError

FOLD_COLUMNS = ("path", "label", "fold")


@dataclass
class FoldSplit:
    """One fold of a folds file: train (the other folds), val (the fold), test (``split == test`` rows)."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    n_folds: int


def read_folds_file(csv_path: Path | str, fold: int) -> FoldSplit:
    """Fold ``fold`` of ``csv_path`` as validation, the other folds as training data.

    Raises:
        LeukolabError: a missing or unreadable file, missing columns, an image that does not
            exist, a fold value that is not an integer >= 0, or ``fold`` outside ``0..K-1``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LeukolabError(f"folds file {csv_path} does not exist; expected a path,label,fold CSV (leukolab split)")
    try:
        header = pd.read_csv(csv_path, nrows=0).columns
    except Exception as exc:
        raise LeukolabError(f"{csv_path}: not a readable CSV file ({exc.__class__.__name__})") from None
    missing = [c for c in FOLD_COLUMNS if c not in header]
    if missing:
        raise LeukolabError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected columns path,label,fold")
    df = read_image_table(csv_path, FOLD_COLUMNS)  # relative paths resolved, every image checked
    df["label"] = df["label"].astype(str)
    is_test = (df["split"].astype(str) == "test").to_numpy() if "split" in df.columns else np.zeros(len(df), bool)
    folds = pd.to_numeric(df["fold"], errors="coerce").to_numpy(dtype=float)
    bad = ~is_test & ~(np.isfinite(folds) & (folds >= 0) & (folds == np.round(folds)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LeukolabError(f"{csv_path}: fold {df['fold'].iloc[i]!r} of {df['path'].iloc[i]} is not an integer >= 0")
    if is_test.all():
        raise LeukolabError(f"{csv_path}: every row is in the test split; expected rows with folds 0..K-1")
    n_folds = int(folds[~is_test].max()) + 1
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise LeukolabError(f"fold {fold!r} is not an integer; expected one of 0..{n_folds - 1} of {csv_path}")
    if not 0 <= fold < n_folds:
        raise LeukolabError(f"--fold {fold} is out of range; {csv_path} has folds 0..{n_folds - 1}")
    names = sorted(df["label"].unique())

    def part(mask: np.ndarray) -> LabelledImages:
        rows = df[mask]
        return LabelledImages([Path(p) for p in rows["path"]], list(rows["label"]), list(names))

    val_mask = ~is_test & (folds == fold)
    if not val_mask.any():
        raise LeukolabError(f"{csv_path}: fold {fold} has no images; expected every fold 0..{n_folds - 1} to hold some")
    train = part(~is_test & ~val_mask)
    if len(set(train.labels)) < 2:
        raise LeukolabError(f"{csv_path}: the training folds (all but {fold}) hold fewer than 2 classes")
    return FoldSplit(train, part(val_mask), part(is_test), n_folds)


def require_inside(split: FoldSplit, folder: Path, csv_path: Path) -> None:
    """Refuse a folds file whose images are not all below ``folder`` (the DATA it was given with)."""
    folder = folder.resolve()
    for data in (split.train, split.val, split.test):
        for p in data.paths:
            if not p.resolve().is_relative_to(folder):
                raise LeukolabError(f"{csv_path}: image {p} is not inside {folder}; expected the folds file of that "
                                    "data (or give --folds-file without DATA)")
