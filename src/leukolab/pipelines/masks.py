"""``leukolab masks``: estimate a cell mask per image and score it against reference masks where they exist.

The segmentation itself is :func:`leukolab.data.masks.segment_cell`. The
masks are written as L-mode 0/255 PNG files mirroring DATA's layout
(``<class>/<name>.png``) into a new folder, with ``masks.csv`` (one row per
image) and, when reference masks exist (``--reference``, or the ``masks/``
folder beside the class folders that ``leukolab synth wbc`` writes),
``iou.csv`` and the mean / median IoU overall and per class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukolab.data.dataset import load_rgb
from leukolab.data.masks import default_masks_dir, find_masks, load_mask, mask_iou, segment_cell
from leukolab.errors import LeukolabError
from leukolab.pipelines.datatools import read_image_set
from leukolab.utils.files import atomic_folder
from leukolab.utils.progress import progress as progress_bar

__all__ = ["MaskOptions", "MasksResult", "estimate_masks"]


@dataclass
class MaskOptions:
    """Options of :func:`estimate_masks`."""

    reference: Path | None = None  # reference masks folder (default: masks/ beside DATA's class folders)
    limit: int | None = None  # a random sample of this many images (drawn with ``seed``); None: all
    seed: int = 0
    progress: bool = True


@dataclass
class MasksResult:
    """What :func:`estimate_masks` wrote and measured."""

    out: Path
    n_images: int
    n_empty: int
    reference: Path | None = None
    iou: pd.DataFrame | None = None  # path, label, reference_mask, iou (images with a reference mask)
    per_class: dict[str, float] = field(default_factory=dict)  # mean IoU per class

    def lines(self) -> list[str]:
        """The one-line summary (and an IoU line when reference masks were scored)."""
        out = [f"wrote {self.n_images} masks to {self.out} ({self.n_empty} empty: no stained cell found)"]
        if self.iou is not None and len(self.iou):
            per_class = ", ".join(f"{k} {v:.3f}" for k, v in self.per_class.items())
            out.append(f"IoU vs {self.reference} over {len(self.iou)} images: mean {self.iou['iou'].mean():.3f}, "
                       f"median {self.iou['iou'].median():.3f}" + (f" (per class: {per_class})" if per_class else ""))
        return out


def _data_root(data: Path) -> Path:
    return data.parent if data.is_file() else data


def _relative(path: Path, root: Path, label: str) -> Path:
    """Where ``path``'s mask goes below the output folder: its path relative to ``root``, else ``<label>/<name>``."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(label or "images") / path.name
    return rel.with_suffix(".png")


def estimate_masks(data: Path | str, out: Path | str, options: MaskOptions | None = None) -> MasksResult:
    """Segment every image of ``data`` (class-folder tree, split tree, CSV or plain folder) into ``out`` (new)."""
    options = options or MaskOptions()
    data, out = Path(data), Path(out)
    images = read_image_set(data)
    indices = list(range(len(images)))
    if options.limit is not None and 0 < options.limit < len(indices):
        indices = sorted(random.Random(options.seed).sample(indices, options.limit))
    paths = [images.paths[i] for i in indices]
    labels = [images.labels[i] for i in indices]
    root = _data_root(data)
    rels = [_relative(p, root, lab) for p, lab in zip(paths, labels, strict=True)]
    seen: dict[Path, Path] = {}
    for p, rel in zip(paths, rels, strict=True):
        if rel in seen:
            raise LeukolabError(f"{seen[rel]} and {p} would both get the mask {rel}; expected distinct image names")
        seen[rel] = p
    ref_dir = Path(options.reference) if options.reference is not None else default_masks_dir(data)
    refs: list[Path | None] = [None] * len(paths)
    if ref_dir is not None:
        roots = [root] + ([root / s for s in ("train", "val", "test") if (root / s).is_dir()])
        refs = find_masks(paths, ref_dir, roots=roots)

    rows: list[dict[str, object]] = []
    iou_rows: list[dict[str, object]] = []

    def fill(tmp: Path) -> None:
        items = list(zip(paths, labels, rels, refs, strict=True))
        for path, label, rel, ref in progress_bar(items, "masks", options.progress):
            image = load_rgb(path)
            mask = segment_cell(np.asarray(image))
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(target)
            rows.append({"path": str(path), "label": label, "mask_path": rel.as_posix(),
                         "area_fraction": round(float(mask.mean()), 5), "empty": not bool(mask.any())})
            if ref is not None:
                reference = load_mask(ref, image.size, path)
                iou_rows.append({"path": str(path), "label": label, "reference_mask": str(ref),
                                 "iou": round(mask_iou(mask, reference), 5)})
        pd.DataFrame(rows).to_csv(tmp / "masks.csv", index=False)
        if iou_rows:
            pd.DataFrame(iou_rows).to_csv(tmp / "iou.csv", index=False)

    atomic_folder(out, fill)
    iou = pd.DataFrame(iou_rows) if iou_rows else None
    per_class: dict[str, float] = {}
    if iou is not None and (iou["label"] != "").any():
        per_class = {str(k): float(v) for k, v in iou.groupby("label")["iou"].mean().items()}
    return MasksResult(out=out, n_images=len(rows), n_empty=sum(bool(r["empty"]) for r in rows),
                       reference=ref_dir if iou is not None else None, iou=iou, per_class=per_class)
