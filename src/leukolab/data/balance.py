"""Class balancing of a training set: per-class counts, a class-balanced sampler, augmented copies.

``leukolab train --balance MODE`` (``data.balance``) picks one of :data:`BALANCE_MODES`:

- ``none``: the data as it is;
- ``weights``: the loss weighted by inverse class frequency (``optim.class_weights``);
- ``oversample``: :func:`balanced_sampler` draws every class with equal expectation;
- ``augment``: :func:`augment_copies` writes augmented copies of the rare classes up to the
  majority count (seed 001's method) into the run folder, and training reads them with the originals.
  When the run uses cell masks, each copy's mask is its source's mask file under the same flip /
  rotation (:meth:`CopyTransform.pair`), written beside the copies (:func:`read_copy_masks`).

Why not torch's :class:`~torch.utils.data.WeightedRandomSampler`: it has no ``set_epoch`` (the
Trainer re-seeds each epoch through it, so a resumed run sees the same draws) and cannot shard one
draw over ``torchrun`` ranks; :class:`BalancedSampler` is the same ``torch.multinomial`` draw with both.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler
from torchvision.transforms import v2

from leukolab.data.dataset import load_rgb
from leukolab.data.masks import load_mask
from leukolab.errors import LeukolabError
from leukolab.utils.files import atomic_folder
from leukolab.utils.progress import progress as progress_bar

__all__ = [
    "BALANCE_MODES", "COPIES_CSV", "COPY_MASKS_DIR", "BalancedSampler", "CopyTransform", "DihedralFlip",
    "augment_copies", "balanced_sampler", "check_balance_mode", "class_counts", "default_copy_transform",
    "read_copies", "read_copy_masks",
]

#: the values of ``data.balance`` / ``--balance``
BALANCE_MODES = ("none", "weights", "oversample", "augment")
#: the table :func:`augment_copies` writes into its folder: ``path`` (relative to it), ``label``, ``source``
#: (and, when masks were given, ``mask``: the copy's mask relative to the folder, empty for a copy without one)
COPIES_CSV = "copies.csv"
#: the sub-folder of :func:`augment_copies`' folder that holds the copies' masks (``masks/<class>/<name>.png``)
COPY_MASKS_DIR = "masks"


def check_balance_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`BALANCE_MODES`, else a one-line :class:`LeukolabError` listing them."""
    if not isinstance(mode, str) or mode not in BALANCE_MODES:
        raise LeukolabError(f"balance mode {mode!r} is unknown; expected one of {', '.join(BALANCE_MODES)}")
    return mode


def class_counts(labels: Sequence[str], class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Images per class: in ``class_names`` order (classes without images count 0), else sorted by name."""
    counts = Counter(labels)
    names = list(class_names) if class_names is not None else sorted(counts)
    return {c: int(counts.get(c, 0)) for c in names}


# --------------------------------------------------------------------------- oversampling
class BalancedSampler(Sampler[int]):
    """Indices drawn with replacement, each class with equal expectation (weight ``1 / count`` per sample).

    The draw of an epoch depends on ``(seed, epoch)`` only (:meth:`set_epoch`; the Trainer calls it),
    so the same seed gives the same draws and a resumed run continues exactly. Under ``torchrun`` every
    rank makes the same global draw of ``num_replicas * len(self)`` indices and keeps every
    ``num_replicas``-th one from ``rank``, so the ranks together see one balanced draw.
    """

    def __init__(self, targets: Sequence[int], num_samples: int, seed: int = 0, *, num_replicas: int = 1,
                 rank: int = 0) -> None:
        targets_t = torch.as_tensor(list(targets), dtype=torch.long)
        if targets_t.numel() == 0:
            raise LeukolabError("a class-balanced sampler needs at least one training image")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise LeukolabError(f"balanced sampler: num_samples {num_samples!r} must be an integer >= 1")
        if not 0 <= rank < num_replicas:
            raise LeukolabError(f"balanced sampler: rank {rank} is outside 0..{num_replicas - 1}")
        counts = torch.bincount(targets_t).double()
        self.weights = 1.0 / counts[targets_t]  # a class with n images: each image 1/n, the class 1 in total
        self.seed, self.epoch = int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_samples = math.ceil(num_samples / self.num_replicas)  # this rank's share of an epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw the indices of ``epoch`` on the next pass."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(idx[self.rank::self.num_replicas].tolist())


def balanced_sampler(targets: Sequence[int], num_samples: int, seed: int, *, num_replicas: int = 1,
                     rank: int = 0) -> Sampler[int]:
    """A :class:`BalancedSampler`: ``num_samples`` indices per epoch (over all ranks), classes drawn with
    equal expectation, the same draws for the same seed (and epoch)."""
    return BalancedSampler(targets, num_samples, seed, num_replicas=num_replicas, rank=rank)


# --------------------------------------------------------------------------- augmented copies
class DihedralFlip:
    """A random flip or 90-degree rotation of a PIL image other than the identity (torch's RNG).

    A square image gets one of the 7 non-identity dihedral transforms; other images only those that keep
    their size (horizontal flip, vertical flip, 180-degree rotation).
    """

    _SQUARE = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
               Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
               Image.Transpose.TRANSVERSE)
    _ANY = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180)

    def draw(self, img: Image.Image) -> Image.Transpose:
        """One random transform for ``img`` (one draw of torch's RNG)."""
        ops = self._SQUARE if img.width == img.height else self._ANY
        return ops[int(torch.randint(len(ops), ()).item())]

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(self.draw(img))

    def pair(self, img: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        """``img`` and its ``mask`` (same size) under one and the same random transform."""
        op = self.draw(img)
        return img.transpose(op), mask.transpose(op)


class CopyTransform:
    """A geometric transform (moves pixels; applied to image and mask alike) then a photometric one (image only).

    ``__call__`` transforms an image; :meth:`pair` an image and its mask with the same geometric draw (the
    ``geometric`` part needs a ``pair(img, mask)`` method, as :class:`DihedralFlip` has). Both draw torch's RNG
    in the same order, so a copy is the same image with or without its mask.
    """

    def __init__(self, geometric: Callable[[Image.Image], Image.Image],
                 photometric: Callable[[Image.Image], Image.Image] | None = None) -> None:
        self.geometric, self.photometric = geometric, photometric

    def __call__(self, img: Image.Image) -> Image.Image:
        img = self.geometric(img)
        return self.photometric(img) if self.photometric is not None else img

    def pair(self, img: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        """The copy of ``img`` and the same geometric transform of its ``mask``."""
        img, mask = self.geometric.pair(img, mask)  # type: ignore[attr-defined]
        return (self.photometric(img) if self.photometric is not None else img), mask


def default_copy_transform() -> CopyTransform:
    """The augmentation of a copy: a random flip/90-degree rotation, then a small colour jitter (PIL in, PIL out;
    :meth:`CopyTransform.pair` moves a mask with the image)."""
    return CopyTransform(DihedralFlip(), v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02))


def _folder_name(label: str, taken: set[str]) -> str:
    """A safe, unique folder name for a class label (CSV labels may hold any character)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip(".") or "class"
    name, k = base, 2
    while name.lower() in taken:  # case-insensitive file systems
        name, k = f"{base}-{k}", k + 1
    taken.add(name.lower())
    return name


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def augment_copies(
    paths: Sequence[Path | str],
    labels: Sequence[str],
    out_dir: Path | str,
    seed: int,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    masks: Sequence[Path | str | None] | None = None,
) -> tuple[list[Path], list[str], dict[str, int]]:
    """Write augmented copies of the rarer classes until every class has the majority class's count.

    Class ``c`` with ``n_c`` images gets ``max_n - n_c`` copies, made from its images in a seeded random
    order (each used once before any is used twice) by ``transform`` (default
    :func:`default_copy_transform`), run under torch's RNG seeded by ``(seed, class, copy)`` so the same
    seed writes the same files. Copies are RGB PNGs in ``out_dir/<class>/`` (``out_dir`` must be absent or
    empty; it is filled atomically, the source images are only read), listed in ``out_dir/copies.csv``.
    With ``masks``, the copy of an image that has a mask file gets that mask under the same geometric
    transform (``transform.pair(image, mask)``), written to ``out_dir/masks/<class>/`` (L mode, 0/255) and
    listed in the table's ``mask`` column (:func:`read_copy_masks`); a copy of an image without one has none.

    Args:
        paths, labels: the training images and their classes.
        out_dir: the folder to create (a run's ``balanced/``, never the user's data).
        seed: seed of the copy order and augmentations.
        transform: PIL image -> PIL image, random through torch's RNG (torchvision transforms are).
        class_names: the classes expected; one without images is an error (default: those in ``labels``).
        progress: show a progress bar.
        masks: the cell mask file of each image (``None`` where it has none), e.g. a run's ``--masks``.

    Returns:
        The originals followed by the copies (paths and labels), and the per-class counts after balancing.

    Raises:
        LeukolabError: a class with zero images, mismatched ``paths``/``labels``/``masks``, a non-empty
            ``out_dir``, a mask of another size than its image, or masks with a transform without ``pair``.
    """
    if len(paths) != len(labels):
        raise LeukolabError(f"augment_copies: {len(paths)} paths but {len(labels)} labels; expected one label each")
    if masks is not None and len(masks) != len(paths):
        raise LeukolabError(f"augment_copies: {len(paths)} paths but {len(masks)} masks; expected one (or None) each")
    counts = class_counts(labels, class_names)
    empty = [c for c, n in counts.items() if n == 0]
    if empty or not counts:
        raise LeukolabError(f"class {empty[0] if empty else '?'!r} has no training images; --balance augment "
                            "needs at least one image of every class to copy")
    top = max(counts.values())
    tf = transform or default_copy_transform()
    with_masks = masks is not None and any(m is not None for m in masks)
    if with_masks and not callable(getattr(tf, "pair", None)):
        raise LeukolabError(f"augment_copies: the transform {type(tf).__name__} has no pair(image, mask) method; "
                            "expected one (e.g. CopyTransform) to move the masks with the copies")
    by_class: dict[str, list[int]] = {c: [] for c in counts}
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    jobs: list[tuple[int, str, int, int]] = []  # (class index, class, copy number, source index)
    for ci, c in enumerate(counts):
        idx = by_class[c]
        g = torch.Generator().manual_seed(seed * 1000003 + ci)
        order = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
        jobs += [(ci, c, k, order[k % len(order)]) for k in range(top - len(idx))]
    out_dir = Path(out_dir)
    taken: set[str] = {COPY_MASKS_DIR} if with_masks else set()  # a class named "masks" gets another folder
    folders = {c: _folder_name(c, taken) for c in counts}
    rel = [f"{folders[c]}/{k:06d}_{Path(paths[src]).stem}.png" for _, c, k, src in jobs]

    def fill(tmp: Path) -> None:
        for c in counts:
            (tmp / folders[c]).mkdir()
            if with_masks:
                (tmp / COPY_MASKS_DIR / folders[c]).mkdir(parents=True)
        rows = []
        for (ci, c, k, src), name in zip(progress_bar(jobs, "balancing copies", progress, total=len(jobs)), rel,
                                         strict=True):
            img = load_rgb(Path(paths[src]))
            mask_file = masks[src] if masks is not None else None
            mask = None
            if mask_file is not None:
                mask = Image.fromarray(load_mask(mask_file, img.size, paths[src]).astype(np.uint8) * 255)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 1000003 + ci) * 1000003 + k)
                copy, mask_copy = tf.pair(img, mask) if mask is not None else (tf(img), None)  # type: ignore[attr-defined]
            if not isinstance(copy, Image.Image):
                raise LeukolabError(f"augment_copies: the transform returned {type(copy).__name__}; "
                                    "expected a PIL image")
            (tmp / name).write_bytes(_png(copy.convert("RGB")))
            row = [name, c, str(paths[src])]
            if with_masks:
                mask_name = f"{COPY_MASKS_DIR}/{name}" if mask_copy is not None else ""
                if mask_copy is not None:
                    (tmp / mask_name).write_bytes(_png(mask_copy.convert("L")))
                row.append(mask_name)
            rows.append(row)
        with open(tmp / COPIES_CSV, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("path", "label", "source", *(("mask",) if with_masks else ())))
            w.writerows(rows)

    atomic_folder(out_dir, fill)
    new_paths = [Path(p) for p in paths] + [out_dir / name for name in rel]
    new_labels = list(labels) + [c for _, c, _, _ in jobs]
    return new_paths, new_labels, class_counts(new_labels, list(counts))


def read_copies(out_dir: Path | str) -> tuple[list[Path], list[str]]:
    """The copies an earlier :func:`augment_copies` wrote into ``out_dir`` (paths and labels, in writing order)."""
    out_dir = Path(out_dir)
    table = out_dir / COPIES_CSV
    if not table.is_file():
        raise LeukolabError(f"{out_dir}: no {COPIES_CSV}; expected a folder written by --balance augment")
    with open(table, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [out_dir / r["path"] for r in rows], [r["label"] for r in rows]


def read_copy_masks(out_dir: Path | str) -> dict[Path, Path]:
    """The mask file of each copy :func:`augment_copies` wrote with a mask into ``out_dir`` (copy path -> mask
    path; empty when it was given no masks or ``out_dir`` holds no copies table)."""
    out_dir = Path(out_dir)
    table = out_dir / COPIES_CSV
    if not table.is_file():
        return {}
    with open(table, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {out_dir / r["path"]: out_dir / r["mask"] for r in rows if r.get("mask")}
