"""Which images to embed and how they enter a model (the ``embed`` and ``viz`` inputs).

A data source is a folder or a CSV, labelled or not:

* a folder of class folders, or one with ``train/val/test`` splits, and a
  ``path,label[,split]`` CSV are read with
  :func:`~leukolab.data.readers.read_labelled` (all splits, in order);
* a folder of images without class folders, or a CSV with a ``path`` but no
  ``label`` column (:func:`~leukolab.data.readers.read_image_table`), is
  unlabelled.

Several sources are stacked by :func:`collect_sources`, with a ``source``
column naming where each row came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from leukolab.data.dataset import load_rgb
from leukolab.data.readers import RESERVED_DIRS, is_image_file, list_images, read_image_table, read_labelled
from leukolab.data.transforms import Normalisation, eval_transform
from leukolab.errors import LeukolabError

__all__ = ["ImageTable", "collect_images", "collect_sources", "load_image_batch"]


@dataclass
class ImageTable:
    """Image paths in order, their labels (``None`` when unlabelled) and per-row metadata.

    ``extra`` has a ``source`` column (the folder name, or the CSV's stem)
    and, for split data, a ``split`` column.
    """

    paths: list[Path]
    labels: list[str] | None
    extra: pd.DataFrame

    def __len__(self) -> int:
        return len(self.paths)


def _has_class_folders(folder: Path) -> bool:
    return any(
        d.is_dir() and not d.name.startswith(".") and d.name not in RESERVED_DIRS
        and any(is_image_file(p) for p in d.rglob("*"))
        for d in folder.iterdir()
    )


def _unlabelled(paths: list[Path], source: str) -> ImageTable:
    return ImageTable(paths, None, pd.DataFrame({"source": [source] * len(paths)}))


def collect_images(data: Path | str, labels: bool = True) -> ImageTable:
    """The images of one data set (see the module docstring); ``labels=False`` ignores labels."""
    data = Path(data)
    if not data.exists():
        raise LeukolabError(f"{data} does not exist; expected an image folder or a path,label CSV file")
    source = data.stem if data.is_file() else data.resolve().name
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise LeukolabError(f"{data}: expected a folder of images or a .csv file")
        table = read_image_table(data)
        if not labels or "label" not in table.columns:
            return _unlabelled([Path(p) for p in table["path"]], source)
    elif not labels or not _has_class_folders(data):
        paths = [p for p in list_images(data) if not set(p.relative_to(data).parts[:-1]) & RESERVED_DIRS]
        if not paths:
            raise LeukolabError(f"{data}: folder holds no images; expected .png/.jpg/.tif ... files")
        return _unlabelled(paths, source)
    parts = read_labelled(data, min_classes=1)
    paths: list[Path] = []
    label_list: list[str] = []
    splits: list[str] = []
    for split, part in parts.items():
        paths += list(part.paths)
        label_list += list(part.labels)
        splits += [split] * len(part)
    extra = {"source": [source] * len(paths)}
    if set(parts) != {"all"}:
        extra["split"] = splits
    return ImageTable(paths, label_list, pd.DataFrame(extra))


def collect_sources(sources: Sequence[Path | str] | Path | str, labels: bool = True) -> ImageTable:
    """Several data sets stacked in order; unlabelled as a whole when any one of them is.

    Rows of a source without splits get ``split`` ``all`` when another source has splits.
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not items:
        raise LeukolabError("no DATA given; expected an image folder or a CSV")
    tables = [collect_images(src, labels=labels) for src in items]
    paths = [p for t in tables for p in t.paths]
    all_labels = None if any(t.labels is None for t in tables) else [lab for t in tables for lab in t.labels or []]
    extra = pd.concat([t.extra for t in tables], ignore_index=True)
    if "split" in extra.columns:
        extra["split"] = extra["split"].fillna("all")
    return ImageTable(paths, all_labels, extra)


def load_image_batch(
    paths: Sequence[Path | str], img_size: int, norm: Normalisation = "leukolab", transform: Any = None
) -> torch.Tensor:
    """``(B, 3, img_size, img_size)`` model inputs of ``paths`` (``transform``, default resized and normalised
    with ``norm``)."""
    tf = transform or eval_transform(img_size, norm)
    return torch.stack([tf(load_rgb(Path(p))) for p in paths])
