"""Torch datasets over image paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from leukolab.errors import LeukolabError

if TYPE_CHECKING:  # preprocess imports this module
    from leukolab.data.preprocess import CellPrep


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as RGB, or a one-line error naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise LeukolabError(f"cannot read image {path} ({exc.__class__.__name__}); expected an image file") from None


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` downscaled (aspect kept, bilinear: PIL's downscaling filters antialias) so that its longer side
    is at most ``max_side``; the decode-time shrink of :class:`ImageDataset` and of every predictor."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


class ImageDataset(Dataset):
    """``(image_tensor, target)`` pairs; ``target`` is -1 for unlabelled images.

    With ``cache=True`` the decoded images are kept in memory after first use,
    which removes decoding from every epoch after the first. ``max_side``
    shrinks larger images on decoding (aspect kept, antialiased) -- e.g. twice
    the training size -- so that every later crop and resize works on a small
    image: on 360-px PBC cells and 64-px training this makes MAE steps ~2x faster.

    Decode-time preprocessing (deterministic, so it is cached with the image): ``prepare`` (PIL -> PIL, a
    run's evaluation preprocessing, :func:`leukolab.data.preprocess.run_preprocess`) is applied before the
    shrink; or ``cells`` (:class:`leukolab.data.preprocess.CellPrep`) finds each image's cell mask (a file,
    or estimated and cached), crops to the cell and shrinks, keeping the mask beside the image for
    ``paired`` -- a per-sample ``(image, mask) -> image`` step before ``transform``
    (:class:`leukolab.data.mask_aug.MaskPaste`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[int] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        cache: bool = False,
        max_side: int | None = None,
        *,
        prepare: Callable[[Image.Image], Image.Image] | None = None,
        cells: CellPrep | None = None,
        paired: Callable[[Image.Image, np.ndarray | None], Image.Image] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.max_side = int(max_side) if max_side else None
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        if len(self.targets) != len(self.paths):
            raise ValueError("paths and targets differ in length")
        if prepare is not None and cells is not None:
            raise ValueError("give prepare or cells, not both")
        self.transform = transform
        self.prepare, self.cells, self.paired = prepare, cells, paired
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        """The decoded RGB image ``i`` (from the cache when enabled)."""
        return self.pair(i)[0]

    def pair(self, i: int) -> tuple[Image.Image, np.ndarray | None]:
        """The decoded (and prepared) image ``i`` and its cell mask (``None`` unless ``cells`` keeps masks)."""
        if self._cache is None:
            return self._decode(i)
        hit = self._cache.get(i)
        if hit is None:
            img, mask = self._decode(i)
            hit = (np.asarray(img), mask)
            self._cache[i] = hit
        return Image.fromarray(hit[0]), hit[1]

    def _decode(self, i: int) -> tuple[Image.Image, np.ndarray | None]:
        img = load_rgb(self.paths[i])
        if self.cells is not None:
            return self.cells(i, img, self.max_side, self.paths[i])
        if self.prepare is not None:
            img = self.prepare(img)
        return (shrink(img, self.max_side) if self.max_side else img), None

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, mask = self.pair(i)
        if self.paired is not None:
            img = self.paired(img, mask)
        return (self.transform(img) if self.transform else img), self.targets[i]
