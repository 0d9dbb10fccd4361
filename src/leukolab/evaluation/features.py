"""Embedding files: one row per image, written by feature extraction, read by the probes.

A :class:`FeatureSet` holds an ``(N, D)`` float32 matrix, the image path of each
row, the class label of each row (``None`` when the data had none) and any
other per-row metadata (e.g. the source data set) as a DataFrame.

Two on-disk formats, chosen by the file suffix:

``.npz``
    ``np.savez_compressed`` with the arrays ``features`` (N, D) float32,
    ``paths`` (N,) str, ``labels`` (N,) str (only when labelled) and one array
    ``extra__<column>`` per extra metadata column. Loaded with
    ``allow_pickle=False``, so the file cannot run code.
``.parquet``
    one float32 column per feature dimension ``f0 .. f{D-1}``, then ``path``,
    ``label`` (only when labelled) and the extra columns (needs ``pyarrow``).

Existing files are never overwritten.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leukolab.errors import LeukolabError
from leukolab.utils.files import atomic_write

__all__ = ["FEATURE_SUFFIXES", "FeatureSet", "load_features", "save_features"]

#: the file suffixes :func:`save_features` / :func:`load_features` understand
FEATURE_SUFFIXES = (".npz", ".parquet")

_EXTRA_PREFIX = "extra__"
_FEATURE_COL = re.compile(r"^f(\d+)$")
_RESERVED_COLUMNS = ("path", "label")


@dataclass
class FeatureSet:
    """Embeddings of N images plus their paths, labels and other metadata.

    Attributes:
        features: ``(N, D)`` float32 matrix, one row per image.
        paths: the image path of each row.
        labels: the class name of each row, or ``None`` when the data had no labels.
        extra: other per-row metadata columns (e.g. ``source``), or ``None``.

    The constructor coerces ``features`` to a C-contiguous float32 array, paths
    and labels to lists of ``str`` and resets the index of ``extra``; it raises
    :class:`LeukolabError` when the lengths disagree.
    """

    features: np.ndarray
    paths: list[str]
    labels: list[str] | None = None
    extra: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        feats = np.ascontiguousarray(np.asarray(self.features), dtype=np.float32)
        if feats.ndim != 2:
            raise LeukolabError(f"features must be a 2-D (N, D) array, got shape {tuple(feats.shape)}")
        self.features = feats
        n = feats.shape[0]
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != n:
            raise LeukolabError(f"features have {n} rows but {len(self.paths)} paths were given")
        if self.labels is not None:
            self.labels = [str(label) for label in self.labels]
            if len(self.labels) != n:
                raise LeukolabError(f"features have {n} rows but {len(self.labels)} labels were given")
        if self.extra is not None:
            if not isinstance(self.extra, pd.DataFrame):
                self.extra = pd.DataFrame(self.extra)
            if len(self.extra) != n:
                raise LeukolabError(f"features have {n} rows but the extra metadata has {len(self.extra)}")
            self.extra = self.extra.reset_index(drop=True)
            if self.extra.shape[1] == 0:
                self.extra = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.features.shape[1])

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels (empty when unlabelled)."""
        return sorted(set(self.labels)) if self.labels is not None else []

    def subset(self, index: Sequence[int] | np.ndarray) -> FeatureSet:
        """The rows ``index`` (integer positions) as a new FeatureSet."""
        idx = np.asarray(index, dtype=np.int64)
        return FeatureSet(
            features=self.features[idx],
            paths=[self.paths[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            extra=None if self.extra is None else self.extra.iloc[idx].reset_index(drop=True),
        )


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FEATURE_SUFFIXES:
        raise LeukolabError(
            f"{path}: unknown features file suffix {path.suffix or '(none)'!r}; expected .npz or .parquet"
        )
    return suffix


def _check_extra_columns(extra: pd.DataFrame, path: Path, suffix: str) -> None:
    for col in extra.columns:
        if not isinstance(col, str) or not col:
            raise LeukolabError(f"{path}: extra metadata column names must be non-empty strings, got {col!r}")
        if suffix == ".parquet" and (col in _RESERVED_COLUMNS or _FEATURE_COL.match(col)):
            raise LeukolabError(
                f"{path}: extra metadata column {col!r} clashes with a reserved column name "
                "(path, label, f0, f1, ...); rename it"
            )


def _extra_to_array(col: pd.Series, name: str, path: Path) -> np.ndarray:
    """A metadata column as a pickle-free numpy array (strings as unicode)."""
    if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
        arr = col.to_numpy()
        if arr.dtype != object:
            return arr
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return col.astype(str).to_numpy(dtype=str)
    values = col.to_numpy(dtype=object)
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
        raise LeukolabError(
            f"{path}: extra metadata column {name!r} has missing values; .npz stores text columns "
            "without them (fill them or save as .parquet)"
        )
    return np.asarray([str(v) for v in values], dtype=str)


def save_features(fs: FeatureSet, path: Path | str) -> Path:
    """Write ``fs`` to ``path`` (``.npz`` or ``.parquet``, chosen by the suffix).

    Parent folders are created. Raises :class:`LeukolabError` when ``path``
    already exists, its suffix is unknown, or an extra column cannot be stored.
    Returns the path written.
    """
    path = Path(path)
    suffix = _suffix(path)
    if path.exists():
        raise LeukolabError(f"{path} already exists; refusing to overwrite it (choose another output path)")
    extra = fs.extra if fs.extra is not None else pd.DataFrame(index=range(len(fs)))
    _check_extra_columns(extra, path, suffix)

    if suffix == ".npz":
        arrays: dict[str, np.ndarray] = {
            "features": np.ascontiguousarray(fs.features, dtype=np.float32),
            "paths": np.asarray(fs.paths, dtype=str).reshape(len(fs)),
        }
        if fs.labels is not None:
            arrays["labels"] = np.asarray(fs.labels, dtype=str).reshape(len(fs))
        for col in extra.columns:
            arrays[_EXTRA_PREFIX + col] = _extra_to_array(extra[col], col, path)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object stops numpy appending ".npz"
                np.savez_compressed(fh, **arrays)

    else:
        _require_pyarrow(path)
        frame = pd.DataFrame(fs.features, columns=[f"f{i}" for i in range(fs.dim)])
        meta = {"path": fs.paths}
        if fs.labels is not None:
            meta["label"] = fs.labels
        frame = pd.concat([frame, pd.DataFrame(meta), extra.reset_index(drop=True)], axis=1)

        def write(tmp: Path) -> None:
            frame.to_parquet(tmp, engine="pyarrow", index=False)

    atomic_write(path, write)  # never overwrites (checked again after writing)
    return path


def _require_pyarrow(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise LeukolabError(f"{path}: reading/writing .parquet needs pyarrow (pip install pyarrow)") from exc


def load_features(path: Path | str) -> FeatureSet:
    """Read a features file written by :func:`save_features`.

    Raises :class:`LeukolabError` for a missing file, an unknown suffix or
    malformed content (unreadable file, missing ``features``/``paths``,
    lengths that disagree, non-numeric features).
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise LeukolabError(f"features file {path} does not exist")
    if suffix == ".npz":
        return _load_npz(path)
    return _load_parquet(path)


def _load_npz(path: Path) -> FeatureSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise LeukolabError(f"{path}: not a readable .npz features file ({exc})") from exc
    for key in ("features", "paths"):
        if key not in arrays:
            raise LeukolabError(f"{path}: malformed features file, missing the {key!r} array")
    feats = arrays["features"]
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
        raise LeukolabError(
            f"{path}: malformed features file, 'features' must be a numeric (N, D) array, "
            f"got {feats.dtype} with shape {feats.shape}"
        )
    n = feats.shape[0]
    columns = {"paths": arrays["paths"], "labels": arrays.get("labels")}
    for key, arr in columns.items():
        if arr is not None and (arr.ndim != 1 or arr.shape[0] != n):
            raise LeukolabError(
                f"{path}: malformed features file, {key!r} has shape {arr.shape} but features have {n} rows"
            )
    extra_cols = {}
    for key, arr in arrays.items():
        if key.startswith(_EXTRA_PREFIX):
            if arr.ndim != 1 or arr.shape[0] != n:
                raise LeukolabError(
                    f"{path}: malformed features file, {key!r} has shape {arr.shape} "
                    f"but features have {n} rows"
                )
            extra_cols[key[len(_EXTRA_PREFIX) :]] = arr
    labels = arrays.get("labels")
    return FeatureSet(
        features=feats.astype(np.float32, copy=False),
        paths=arrays["paths"].astype(str).tolist(),
        labels=None if labels is None else labels.astype(str).tolist(),
        extra=pd.DataFrame(extra_cols) if extra_cols else None,
    )


def _load_parquet(path: Path) -> FeatureSet:
    _require_pyarrow(path)
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as exc:  # pyarrow raises a zoo of types for corrupt files
        raise LeukolabError(f"{path}: not a readable .parquet features file ({exc})") from exc
    dims: dict[int, str] = {}
    for col in frame.columns:
        match = _FEATURE_COL.match(str(col))
        if match:
            dims[int(match.group(1))] = col
    if not dims:
        raise LeukolabError(f"{path}: malformed features file, no feature columns f0, f1, ... found")
    if sorted(dims) != list(range(len(dims))):
        missing = sorted(set(range(max(dims) + 1)) - set(dims))
        raise LeukolabError(f"{path}: malformed features file, feature column f{missing[0]} is missing")
    if "path" not in frame.columns:
        raise LeukolabError(f"{path}: malformed features file, missing the 'path' column")
    feat_cols = [dims[i] for i in range(len(dims))]
    try:
        feats = frame[feat_cols].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise LeukolabError(
            f"{path}: malformed features file, feature columns are not numeric ({exc})"
        ) from exc
    labels = None
    if "label" in frame.columns:
        if frame["label"].isna().any():
            raise LeukolabError(f"{path}: malformed features file, the 'label' column has missing values")
        labels = frame["label"].astype(str).tolist()
    if frame["path"].isna().any():
        raise LeukolabError(f"{path}: malformed features file, the 'path' column has missing values")
    extra_names = [c for c in frame.columns if c not in set(feat_cols) and c not in _RESERVED_COLUMNS]
    extra = frame[extra_names].reset_index(drop=True) if extra_names else None
    return FeatureSet(features=feats, paths=frame["path"].astype(str).tolist(), labels=labels, extra=extra)
