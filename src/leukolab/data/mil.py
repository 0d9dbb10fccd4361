"""Patients as bags of cells: the lymphocytosis layout, clinical data, patient-level splits, bag batches.

The layout is the public lymphocytosis cohort's (and :func:`leukolab.data.synthetic.make_patients`')::

    root/<patient_id>/*.jpg|png        one folder of cell crops per patient
    root/clinical_annotation.csv       ID, LABEL, GENDER, DOB, LYMPH_COUNT (other columns ignored)

* :func:`read_clinical` parses the table: ``DOB`` as ``M/D/YYYY``, ``DD-MM-YYYY``
  or ``YYYY-MM-DD`` (the cohort mixes the first two), turned into an age in years
  at a reference date; ``GENDER`` ``M``/``F`` in any case; ``LYMPH_COUNT`` a
  positive number; ``LABEL`` 0 (reactive), 1 (tumoral) or empty / absent
  (a patient to predict).
* :func:`read_cohort` pairs the table with the folders; a folder without a row,
  a row without a folder and an empty folder are one-line errors.
* :func:`patient_folds` / :func:`patient_split` split *patients* (never cells),
  stratified by label, so no patient's cells are on both sides.
* :class:`BagDataset` + :func:`collate_bags` batch bags of different sizes with a
  padding mask; a training bag may be a random subset of its cells each epoch
  (bag-level augmentation).

Clinical features (:data:`CLINICAL_FEATURES`) are numbers the models take as
they are given here: ``age`` in years, ``lymph_count`` as ``log`` of the count,
``gender`` 0 for M and 1 for F. Models standardise them with training statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import Dataset

from leukolab.data.dataset import load_rgb
from leukolab.data.readers import RESERVED_DIRS, list_images
from leukolab.data.synthetic.patients import REFERENCE_DATE
from leukolab.errors import LeukolabError

__all__ = [
    "CLASS_NAMES",
    "CLINICAL_FEATURES",
    "CLINICAL_FILE",
    "BagDataset",
    "Cohort",
    "Patient",
    "check_clinical_features",
    "collate_bags",
    "parse_date",
    "patient_folds",
    "patient_split",
    "read_clinical",
    "read_cohort",
]

#: the clinical features a model can take, in their canonical order
CLINICAL_FEATURES: tuple[str, ...] = ("age", "lymph_count", "gender")
#: the clinical table's name inside a cohort folder
CLINICAL_FILE = "clinical_annotation.csv"
#: label 0 and label 1
CLASS_NAMES: tuple[str, str] = ("reactive", "tumoral")
_REQUIRED = ("ID", "GENDER", "DOB", "LYMPH_COUNT")


@dataclass(frozen=True)
class Patient:
    """One patient: id, label (``None`` when unknown), clinical data and the cell crops."""

    patient_id: str
    label: int | None
    gender: str
    age: float
    lymph_count: float
    cells: tuple[Path, ...] = ()

    def clinical(self, features: Sequence[str]) -> list[float]:
        """The values of ``features`` (see the module docstring for their units)."""
        values = {"age": self.age, "lymph_count": math.log(self.lymph_count), "gender": float(self.gender == "F")}
        return [values[f] for f in features]


@dataclass
class Cohort:
    """Patients in a stable order (sorted by id), read from ``root``."""

    patients: list[Patient]
    root: Path | None = None
    reference_date: date = REFERENCE_DATE
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def ids(self) -> list[str]:
        """Patient ids, in order."""
        return [p.patient_id for p in self.patients]

    @property
    def labelled(self) -> bool:
        """True when every patient has a label."""
        return all(p.label is not None for p in self.patients)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 labels; -1 where unknown."""
        return np.array([-1 if p.label is None else p.label for p in self.patients], dtype=np.int64)

    def clinical(self, features: Sequence[str]) -> np.ndarray:
        """``(N, len(features))`` float32 clinical matrix."""
        return np.array([p.clinical(features) for p in self.patients], dtype=np.float32).reshape(len(self), -1)

    def subset(self, index: Sequence[int] | np.ndarray) -> Cohort:
        """The patients at ``index``."""
        return Cohort([self.patients[int(i)] for i in index], self.root, self.reference_date, list(self.notes))

    def table(self) -> pd.DataFrame:
        """One row per patient: id, label, gender, age, lymph_count, n_cells."""
        return pd.DataFrame(
            {"patient": self.ids, "label": [p.label for p in self.patients],
             "gender": [p.gender for p in self.patients], "age": [round(p.age, 2) for p in self.patients],
             "lymph_count": [p.lymph_count for p in self.patients],
             "n_cells": [len(p.cells) for p in self.patients]}
        )


def check_clinical_features(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """Clinical feature names (comma-separated text or a list; ``none`` or empty for none), in canonical order."""
    if names is None:
        return ()
    items = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n and n != "none"]
    unknown = [n for n in items if n not in CLINICAL_FEATURES]
    if unknown:
        raise LeukolabError(f"unknown clinical feature {unknown[0]!r}; expected some of {', '.join(CLINICAL_FEATURES)}")
    return tuple(f for f in CLINICAL_FEATURES if f in items)


_DATE_FORMATS = (
    (re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$"), ("month", "day", "year")),
    (re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{4})$"), ("day", "month", "year")),
    (re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$"), ("year", "month", "day")),
)


def parse_date(text: object, where: str = "date") -> date:
    """A date written ``M/D/YYYY``, ``DD-MM-YYYY`` or ``YYYY-MM-DD``; else a one-line error naming ``where``."""
    s = str(text).strip()
    for pattern, order in _DATE_FORMATS:
        m = pattern.match(s)
        if m:
            parts = dict(zip(order, (int(g) for g in m.groups()), strict=True))
            try:
                return date(parts["year"], parts["month"], parts["day"])
            except ValueError:
                break
    raise LeukolabError(f"{where}: cannot read the date {s!r}; expected M/D/YYYY, DD-MM-YYYY or YYYY-MM-DD")


def _label(value: object, where: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    try:
        f = float(str(value).strip())
    except ValueError:
        f = math.nan
    if f not in (0.0, 1.0):
        raise LeukolabError(f"{where}: LABEL {value!r} is not 0 (reactive), 1 (tumoral) or empty (to predict)")
    return int(f)


def _count(value: object, where: str) -> float:
    try:
        f = float(str(value).strip().replace(",", "."))
    except ValueError:
        f = math.nan
    if not math.isfinite(f) or f <= 0:
        raise LeukolabError(f"{where}: LYMPH_COUNT {value!r} is not a positive number")
    return f


def _gender(value: object, where: str) -> str:
    g = str(value).strip().upper()
    if g not in ("M", "F"):
        raise LeukolabError(f"{where}: GENDER {value!r} is not M or F")
    return g


def read_clinical(path: Path | str, reference_date: date = REFERENCE_DATE) -> pd.DataFrame:
    """The clinical table as ``patient, label, gender, age, lymph_count`` (label ``None`` when unknown).

    Column names are matched case-insensitively; ``LABEL`` may be missing
    (every patient is then to be predicted); an unnamed index column and any
    other column are ignored. Ages are in years at ``reference_date``.

    Raises:
        LeukolabError: a missing file or column, a duplicate ID, or a value that
            cannot be read (the message names the file, the patient and the value).
    """
    path = Path(path)
    if not path.is_file():
        raise LeukolabError(f"clinical table {path} does not exist; expected a CSV with {', '.join(_REQUIRED)}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LeukolabError(f"{path}: cannot read the CSV ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    columns = {str(c).strip().upper(): c for c in raw.columns}
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise LeukolabError(f"{path}: no column {missing[0]}; expected the columns ID, LABEL, GENDER, DOB, LYMPH_COUNT")
    rows = []
    seen: set[str] = set()
    for i, rec in enumerate(raw.to_dict("records")):
        pid = str(rec[columns["ID"]]).strip()
        where = f"{path.name} row {i + 2} (patient {pid or '?'})"
        if not pid:
            raise LeukolabError(f"{where}: empty ID")
        if pid in seen:
            raise LeukolabError(f"{path.name}: patient {pid} appears twice")
        seen.add(pid)
        born = parse_date(rec[columns["DOB"]], f"{where} DOB")
        age = (reference_date - born).days / 365.25
        if age < 0:
            raise LeukolabError(f"{where}: DOB {rec[columns['DOB']]!r} is after the reference date {reference_date}")
        rows.append({
            "patient": pid,
            "label": _label(rec[columns["LABEL"]], where) if "LABEL" in columns else None,
            "gender": _gender(rec[columns["GENDER"]], where),
            "age": age,
            "lymph_count": _count(rec[columns["LYMPH_COUNT"]], where),
        })
    if not rows:
        raise LeukolabError(f"{path}: no patients in the clinical table")
    frame = pd.DataFrame(rows, columns=["patient", "label", "gender", "age", "lymph_count"])
    frame["label"] = pd.Series([r["label"] for r in rows], dtype=object)  # None (not NaN) where unknown
    return frame


def read_cohort(
    root: Path | str,
    clinical: Path | str | None = None,
    reference_date: date = REFERENCE_DATE,
    require_labels: bool = False,
) -> Cohort:
    """Patients from one folder per patient plus the clinical table (default ``root/clinical_annotation.csv``).

    Every sub-folder of ``root`` (hidden ones and ``masks`` aside) is a patient;
    its images (any of leukolab's image formats, sorted by name) are the bag.

    Raises:
        LeukolabError: ``root`` is not a folder; a folder without a clinical row
            or a row without a folder; an empty bag; with ``require_labels``, a
            patient without a label; or any error of :func:`read_clinical`.
    """
    root = Path(root)
    if not root.is_dir():
        raise LeukolabError(f"bags folder {root} does not exist; expected one folder of cell images per patient")
    table = read_clinical(clinical if clinical is not None else root / CLINICAL_FILE, reference_date)
    folders = {d.name: d for d in sorted(root.iterdir())
               if d.is_dir() and not d.name.startswith((".", "_")) and d.name not in RESERVED_DIRS}
    rows = {r["patient"]: r for r in table.to_dict("records")}
    no_row = sorted(set(folders) - set(rows))
    if no_row:
        raise LeukolabError(f"patient folder {folders[no_row[0]]} has no row in the clinical table"
                            + (f" (nor do {len(no_row) - 1} other folders)" if len(no_row) > 1 else ""))
    no_folder = sorted(set(rows) - set(folders))
    if no_folder:
        raise LeukolabError(f"clinical row of patient {no_folder[0]} has no folder {root / no_folder[0]}"
                            + (f" (nor do {len(no_folder) - 1} other rows)" if len(no_folder) > 1 else ""))
    patients = []
    for pid in sorted(rows, key=_natural):
        r = rows[pid]
        cells = tuple(list_images(folders[pid]))
        if not cells:
            raise LeukolabError(f"patient {pid}: the bag {folders[pid]} holds no images")
        if require_labels and r["label"] is None:
            raise LeukolabError(f"patient {pid} has no LABEL; training needs 0 or 1 for every patient")
        patients.append(Patient(pid, r["label"], r["gender"], float(r["age"]), float(r["lymph_count"]), cells))
    return Cohort(patients, root, reference_date)


def _natural(text: str) -> tuple[Any, ...]:
    """Sort key that orders ``P2`` before ``P10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _check_classes(labels: np.ndarray, per_class: int, what: str) -> None:
    if (labels < 0).any():
        raise LeukolabError(f"{what} needs a label for every patient; {int((labels < 0).sum())} have none")
    counts = {c: int((labels == c).sum()) for c in (0, 1)}
    for c, n in counts.items():
        if n < per_class:
            raise LeukolabError(
                f"{what}: only {n} {CLASS_NAMES[c]} patient(s) (label {c}); need at least {per_class} per class"
            )


def patient_folds(labels: Sequence[int] | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of every patient: stratified k-fold over patients (scikit-learn's ``StratifiedKFold``).

    Raises:
        LeukolabError: ``k`` < 2, a patient without a label, or fewer patients of a class than folds.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if isinstance(k, bool) or int(k) < 2:
        raise LeukolabError(f"--folds {k} must be at least 2")
    _check_classes(labels, int(k), f"{k}-fold cross-validation")
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[test] = i
    return fold


def patient_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train, val)`` patient indices (sorted); at least one patient of each class in each part."""
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 < val_fraction < 1.0:
        raise LeukolabError(f"validation fraction {val_fraction} must be in (0, 1)")
    _check_classes(labels, 2, "a train/validation split")
    n_val = min(len(labels) - 2, max(2, round(val_fraction * len(labels))))
    train, val = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=int(seed))
    return np.sort(train), np.sort(val)


class BagDataset(Dataset):
    """One item per patient: its cells (cached embeddings or images), clinical vector, label and index.

    Args:
        bags: per patient either a ``(n_i, D)`` tensor of cell embeddings, or the
            cell image paths (decoded with ``transform`` into ``(n_i, 3, H, W)``).
        clinical: ``(N, C)`` clinical features (``C`` may be 0).
        labels: ``(N,)`` labels (-1 for unknown).
        transform: image transform (required for path bags).
        max_cells: at most this many cells per bag (a random subset when
            ``sample``; the first ones otherwise). 0 = no limit.
        sample: draw a random subset of each bag on every access (training):
            ``keep_fraction`` of its cells (at least ``min_cells``), then ``max_cells``.
        keep_fraction: share of a bag's cells kept when ``sample``.
        min_cells: fewest cells a sampled bag keeps.

    Items are dicts: ``x`` (cells), ``cells`` (the kept cells' positions in the
    bag), ``clinical``, ``label``, ``index`` (the patient's position).
    Random subsets use torch's global generator (seeded by the Trainer).
    """

    def __init__(
        self,
        bags: Sequence[torch.Tensor] | Sequence[Sequence[Path]],
        clinical: np.ndarray | torch.Tensor,
        labels: np.ndarray | Sequence[int],
        transform: Callable[[Any], torch.Tensor] | None = None,
        max_cells: int = 0,
        sample: bool = False,
        keep_fraction: float = 1.0,
        min_cells: int = 8,
    ) -> None:
        if len(bags) != len(labels) or len(bags) != len(clinical):
            raise ValueError(f"{len(bags)} bags, {len(clinical)} clinical rows and {len(labels)} labels differ")
        if not 0.0 < keep_fraction <= 1.0:
            raise LeukolabError(f"bag keep fraction {keep_fraction} must be in (0, 1]")
        self.bags = list(bags)
        self.clinical = torch.as_tensor(np.asarray(clinical, dtype=np.float32)).reshape(len(self.bags), -1)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.transform = transform
        self.max_cells = int(max_cells)
        self.sample = sample
        self.keep_fraction = float(keep_fraction)
        self.min_cells = int(min_cells)
        if any(not torch.is_tensor(b) for b in self.bags) and transform is None:
            raise ValueError("bags of image paths need a transform")

    def __len__(self) -> int:
        return len(self.bags)

    def _pick(self, n: int) -> torch.Tensor:
        if self.sample:
            keep = min(n, max(self.min_cells, round(self.keep_fraction * n)))
            if self.max_cells:
                keep = min(keep, self.max_cells)
            return torch.randperm(n)[:keep].sort().values
        return torch.arange(min(n, self.max_cells) if self.max_cells else n)

    def __getitem__(self, i: int) -> dict[str, Any]:
        bag = self.bags[i]
        cells = self._pick(len(bag))
        if torch.is_tensor(bag):
            x = bag[cells]
        else:
            assert self.transform is not None
            x = torch.stack([self.transform(load_rgb(Path(bag[int(j)]))) for j in cells])
        return {"x": x, "cells": cells, "clinical": self.clinical[i], "label": self.labels[i], "index": i}


def collate_bags(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad bags to the largest in the batch.

    Returns ``x`` ``(B, N, ...)`` (zeros where padded), ``mask`` ``(B, N)`` (True
    for real cells), ``cells`` ``(B, N)`` (positions in the bag, -1 where padded),
    ``clinical`` ``(B, C)``, ``label`` ``(B,)`` and ``index`` ``(B,)``.
    """
    n = max(len(it["x"]) for it in items)
    first = items[0]["x"]
    x = first.new_zeros((len(items), n, *first.shape[1:]))
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    cells = torch.full((len(items), n), -1, dtype=torch.long)
    for b, it in enumerate(items):
        k = len(it["x"])
        x[b, :k] = it["x"]
        mask[b, :k] = True
        cells[b, :k] = it["cells"]
    return {
        "x": x,
        "mask": mask,
        "cells": cells,
        "clinical": torch.stack([it["clinical"] for it in items]),
        "label": torch.stack([torch.as_tensor(it["label"]) for it in items]),
        "index": torch.tensor([int(it["index"]) for it in items]),
    }
