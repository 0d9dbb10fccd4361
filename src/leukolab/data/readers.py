"""Read labelled image collections: ImageFolder trees and ``path,label`` CSV files.

Both give a :class:`LabelledImages`; a folder with ``train/``, ``val/`` and/or
``test/`` subfolders gives one per split (see :func:`read_labelled`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from leukolab.errors import LeukolabError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: folder names inside an ImageFolder tree that are never classes
RESERVED_DIRS = frozenset({"masks", "__pycache__"})
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class LabelledImages:
    """Image paths with their class names, in a stable order."""

    paths: list[Path]
    labels: list[str]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.paths)

    def targets(self, class_names: list[str] | None = None) -> list[int]:
        """Integer class index of every image (in ``class_names`` order).

        A label that is not in ``class_names`` matches the name that differs from it only in case
        (``EOSINOPHIL`` -> ``eosinophil``), when exactly one does; any other label is a one-line error.
        """
        names = list(class_names or self.class_names)
        index = {c: i for i, c in enumerate(names)}
        folded: dict[str, list[int]] = {}
        for i, c in enumerate(names):
            folded.setdefault(c.casefold(), []).append(i)
        for label in sorted(set(self.labels) - set(index)):
            matches = folded.get(label.casefold(), [])
            if len(matches) != 1:
                raise LeukolabError(
                    f"class {label!r} is not one the model knows; expected one of: {', '.join(names)}"
                )
            index[label] = matches[0]
        return [index[label] for label in self.labels]

    def subset(self, indices: list[int]) -> LabelledImages:
        """The images at ``indices`` (class names kept)."""
        return LabelledImages(
            [self.paths[i] for i in indices], [self.labels[i] for i in indices], list(self.class_names)
        )


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is a known image format."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def expand_image_inputs(inputs: Iterable[Path | str], limit: int | None = None) -> list[Path]:
    """Image files and the images inside folders (recursive, sorted), at most ``limit`` in all."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise LeukolabError(f"{item}: folder holds no images")
            paths += found
        elif is_image_file(item):
            paths.append(item)
        elif item.exists():
            raise LeukolabError(f"{item}: not an image file; expected .png/.jpg/.tif ...")
        else:
            raise LeukolabError(f"{item} does not exist")
    if not paths:
        raise LeukolabError("no images given")
    if limit is not None and limit > 0:
        paths = paths[:limit]
    return paths


def read_image_folder(root: Path, *, min_classes: int = 2) -> LabelledImages:
    """An ImageFolder tree: one subfolder per class holding its images (any depth)."""
    class_dirs = sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in RESERVED_DIRS
    )
    if not class_dirs:
        raise LeukolabError(f"{root}: no class folders found; expected one subfolder of images per class")
    paths: list[Path] = []
    labels: list[str] = []
    for d in class_dirs:
        images = list_images(d)
        if not images:
            raise LeukolabError(
                f"class folder {d} holds no images; expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        paths += images
        labels += [d.name] * len(images)
    data = LabelledImages(paths, labels, [d.name for d in class_dirs])
    _require_classes(data, root, min_classes)
    return data


def read_csv(csv_path: Path, *, min_classes: int = 2) -> dict[str, LabelledImages]:
    """A CSV with ``path`` and ``label`` columns (and optionally ``split``).

    Relative paths are taken relative to the CSV's folder. With a ``split``
    column, one :class:`LabelledImages` per split value is returned; otherwise
    everything is under ``"all"``.
    """
    df = read_image_table(csv_path, ("path", "label"))
    df["label"] = df["label"].astype(str)
    class_names = sorted(df["label"].unique())
    groups = df.groupby("split", sort=False) if "split" in df.columns else [("all", df)]
    out = {}
    for name, part in groups:
        out[str(name)] = LabelledImages([Path(p) for p in part["path"]], list(part["label"]), class_names)
    if "all" in out:
        _require_classes(out["all"], csv_path, min_classes)
    return out


def read_image_table(csv_path: Path | str, columns: Sequence[str] = ("path",)) -> pd.DataFrame:
    """A CSV of images with at least ``columns`` (``path`` always); one row per image.

    Relative paths are taken relative to the CSV's folder; every image must
    exist. Raises :class:`LeukolabError` for an unreadable file, missing
    columns, no rows or missing images.
    """
    csv_path = Path(csv_path)
    try:
        df = pd.read_csv(csv_path)
    except Exception as exc:
        raise LeukolabError(f"{csv_path}: not a readable CSV file ({exc.__class__.__name__})") from None
    missing = ({"path"} | set(columns)) - set(df.columns)
    if missing:
        expected = "path,label[,split]" if "label" in columns else "path[,label[,split]]"
        raise LeukolabError(
            f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; expected columns {expected}"
        )
    if df.empty:
        raise LeukolabError(f"{csv_path}: no rows; expected one row per image")
    base = csv_path.parent
    df["path"] = [p if Path(p).is_absolute() else str(base / p) for p in df["path"].astype(str)]
    absent = [p for p in df["path"] if not Path(p).is_file()]
    if absent:
        raise LeukolabError(f"{csv_path}: image {absent[0]} does not exist ({len(absent)} missing in all)")
    return df


def read_labelled(path: Path | str, *, min_classes: int = 2) -> dict[str, LabelledImages]:
    """Read a data set given as a folder or a CSV file.

    Returns ``{"all": data}`` for an unsplit set, or ``{"train": ..., "val": ...,
    "test": ...}`` (whichever exist) when the folder has split subfolders or the
    CSV a ``split`` column.
    """
    path = Path(path)
    if not path.exists():
        raise LeukolabError(f"{path} does not exist; expected an image folder or a path,label CSV file")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise LeukolabError(f"{path}: expected a folder of class folders or a .csv file")
        return read_csv(path, min_classes=min_classes)
    splits = {s: path / s for s in SPLIT_NAMES if (path / s).is_dir()}
    if splits and "train" in splits:
        out = {s: read_image_folder(d, min_classes=min_classes) for s, d in splits.items()}
        names = out["train"].class_names
        for s, data in out.items():
            extra = sorted(set(data.class_names) - set(names))
            if extra:
                raise LeukolabError(f"{splits[s]}: class {extra[0]!r} is not in {splits['train']}")
            data.class_names = list(names)
        return out
    return {"all": read_image_folder(path, min_classes=min_classes)}


def _require_classes(data: LabelledImages, where: Path, min_classes: int) -> None:
    if len(data.class_names) < min_classes:
        found = ", ".join(data.class_names) or "none"
        raise LeukolabError(
            f"{where}: found {len(data.class_names)} class(es) ({found}); expected at least {min_classes}"
        )
