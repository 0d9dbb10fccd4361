"""Writers of the synthetic crop data sets: labelled WBC crops and tissue patches (ImageFolder) and unlabelled
pretraining pools.

Every image's generator is derived from ``(seed, stream, index)``, so the same
seed gives byte-identical files and asking for more images never changes the
first ones. Folders are written through :func:`leukolab.utils.files.atomic_folder`
(never over an existing non-empty folder).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from leukolab.data.synthetic.cells import WBC_CLASSES, check_label, render_cell
from leukolab.data.synthetic.checks import check_count, check_fraction, check_seed, check_size
from leukolab.data.synthetic.tissue import TISSUE_CLASSES, render_tissue_patch
from leukolab.errors import LeukolabError
from leukolab.utils.files import atomic_folder

_POOL_STREAM = 1000  # second entropy word of pool images; WBC datasets use the class index 0..4
_TISSUE_STREAM = 2000  # labelled tissue: 2000 + the index of the class in TISSUE_CLASSES

_T = TypeVar("_T")


def progress_bar(it: Iterable[_T], total: int, desc: str, enabled: bool) -> Iterable[_T]:
    """``it`` wrapped in a tqdm bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # no bar without tqdm
        return it
    return tqdm(it, total=total, desc=desc, unit="img")


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write an array as a PNG (fixed settings, so the bytes are deterministic)."""
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def make_wbc_dataset(
    out: Path,
    n_per_class: int,
    size: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    classes: Sequence[str] = WBC_CLASSES,
    progress: bool = True,
) -> Path:
    """Write a labelled synthetic WBC dataset in ImageFolder layout.

    Layout (all paths in the CSV relative to ``out``)::

        out/<class>/<class>_00000.png         RGB crop
        out/masks/<class>/<class>_00000.png   L-mode 0/255 mask of the WBC
        out/metadata.csv                      columns path,label,mask_path

    Image ``i`` of class ``c`` is drawn from ``np.random.default_rng([seed, k, i])``
    where ``k`` is ``c``'s index in :data:`WBC_CLASSES`, so the same seed gives
    byte-identical files and a larger ``n_per_class`` (or a subset of
    ``classes``) leaves the shared images unchanged.

    Args:
        out: folder to create; it must not exist or be empty (never overwritten).
        n_per_class: images per class (>= 1).
        size: side of the square crops in pixels (>= 16).
        seed: non-negative integer seed.
        difficulty: nuisance / class-overlap level in [0, 1], see :func:`render_cell`.
        classes: which classes to write (default all of :data:`WBC_CLASSES`).
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        ``out``.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n_per_class = check_count("n_per_class", n_per_class)
    size = check_size(size)
    seed = check_seed(seed)
    difficulty = check_fraction("difficulty", difficulty)
    if isinstance(classes, str):
        raise LeukolabError(f"classes must be a sequence of class names, got the string {classes!r}")
    classes = [check_label(c) for c in classes]
    if not classes:
        raise LeukolabError("classes must name at least one WBC class, got none")
    if len(set(classes)) != len(classes):
        raise LeukolabError(f"classes has duplicates: {', '.join(classes)}")
    width = max(5, len(str(n_per_class - 1)))
    jobs = [(c, i) for c in classes for i in range(n_per_class)]

    def fill(root: Path) -> None:
        rows: list[tuple[str, str, str]] = []
        for c in classes:
            (root / c).mkdir()
            (root / "masks" / c).mkdir(parents=True)
        for c, i in progress_bar(jobs, len(jobs), "synthetic WBCs", progress):
            rng = np.random.default_rng([seed, WBC_CLASSES.index(c), i])
            img, mask = render_cell(c, size, rng, difficulty)
            name = f"{c}_{i:0{width}d}.png"
            save_png(img, root / c / name)
            save_png(mask.astype(np.uint8) * 255, root / "masks" / c / name)
            rows.append((f"{c}/{name}", c, f"masks/{c}/{name}"))
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "label", "mask_path"))
            w.writerows(rows)

    return atomic_folder(out, fill)


def _is_tissue(seed: int, i: int, fraction: float) -> bool:
    """Low-discrepancy choice of kind: the running tissue share stays close to ``fraction``."""
    offset = float(np.random.default_rng([seed, _POOL_STREAM]).random())
    return (offset + i * 0.6180339887498949) % 1.0 < fraction


def make_pool(
    out: Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    tissue_fraction: float = 0.3,
    difficulty: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write an unlabelled pretraining pool: WBC crops of random class mixed with tissue patches.

    Layout::

        out/pool_00000.png ...   flat folder of RGB PNGs
        out/pool.csv             columns path,kind (kind is ``wbc`` or ``tissue``)

    Image ``i`` is drawn from ``np.random.default_rng([seed, 1000, i])`` (a stream
    disjoint from :func:`make_wbc_dataset`'s), and whether it is tissue depends
    only on ``(seed, i)``, so a larger ``n`` leaves the first images unchanged.
    The tissue share is within about ``1/n`` of ``tissue_fraction``.

    Args:
        out: folder to create; it must not exist or be empty (never overwritten).
        n: number of images (>= 1).
        size: side of the square images in pixels (>= 16).
        seed: non-negative integer seed.
        tissue_fraction: share of tissue patches, in [0, 1].
        difficulty: difficulty of the WBC crops, see :func:`render_cell`.
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        ``out``.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n = check_count("n", n)
    size = check_size(size)
    seed = check_seed(seed)
    tissue_fraction = check_fraction("tissue_fraction", tissue_fraction)
    difficulty = check_fraction("difficulty", difficulty)
    width = max(5, len(str(n - 1)))

    def fill(root: Path) -> None:
        rows: list[tuple[str, str]] = []
        for i in progress_bar(range(n), n, "synthetic pool", progress):
            rng = np.random.default_rng([seed, _POOL_STREAM, i])
            if _is_tissue(seed, i, tissue_fraction):
                kind, img = "tissue", render_tissue_patch(size, rng)
            else:
                label = WBC_CLASSES[int(rng.integers(len(WBC_CLASSES)))]
                kind, img = "wbc", render_cell(label, size, rng, difficulty)[0]
            name = f"pool_{i:0{width}d}.png"
            save_png(img, root / name)
            rows.append((name, kind))
        with open(root / "pool.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "kind"))
            w.writerows(rows)

    return atomic_folder(out, fill)


def make_tissue_dataset(
    out: Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write a labelled normal-vs-tumour tissue set in ImageFolder layout (the seeds' Camelyon16 stand-in).

    Layout (paths in the CSV relative to ``out``)::

        out/normal/normal_00000.png ...   out/tumour/tumour_00000.png ...
        out/metadata.csv                  columns path,label

    Image ``i`` (0-based, in writing order) has class ``TISSUE_CLASSES[i % 2]`` and is
    the ``j = i // 2``-th of its class, drawn from ``np.random.default_rng([seed, 2000 + k, j])``
    (``k`` the class index): the classes are balanced (``ceil(n/2)`` normal), the same seed
    gives byte-identical files and a larger ``n`` leaves the first images unchanged.

    Args:
        out: folder to create; it must not exist or be empty (never overwritten).
        n: number of images in all (>= 2).
        size: side of the square patches in pixels (>= 16).
        seed: non-negative integer seed.
        difficulty: class overlap in [0, 1], see :func:`render_tissue_patch`.
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        ``out``.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n = check_count("n", n)
    if n < len(TISSUE_CLASSES):
        raise LeukolabError(f"n must be >= {len(TISSUE_CLASSES)} (one image per class), got {n}")
    size = check_size(size)
    seed = check_seed(seed)
    difficulty = check_fraction("difficulty", difficulty)
    width = max(5, len(str(n // 2)))

    def fill(root: Path) -> None:
        rows: list[tuple[str, str]] = []
        for c in TISSUE_CLASSES:
            (root / c).mkdir()
        for i in progress_bar(range(n), n, "synthetic tissue", progress):
            k, j = i % len(TISSUE_CLASSES), i // len(TISSUE_CLASSES)
            label = TISSUE_CLASSES[k]
            img = render_tissue_patch(size, np.random.default_rng([seed, _TISSUE_STREAM + k, j]), label, difficulty)
            name = f"{label}_{j:0{width}d}.png"
            save_png(img, root / label / name)
            rows.append((f"{label}/{name}", label))
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "label"))
            w.writerows(sorted(rows))

    return atomic_folder(out, fill)
