"""Mask-based background replacement: the cell cut out by its mask and pasted onto another background.

A classifier trained on one lab's crops learns that lab's plasma colour, red-cell density and framing
as much as the white cell. :class:`MaskPaste` (``--mask-aug P``) keeps the cell's pixels exactly and
replaces every other pixel, with probability ``P``, by one of (``--mask-bg``):

* ``other``: another training image whose own cell is painted over with its plasma colour (median of
  its background pixels, plus mild noise), so its red cells and illumination remain;
* ``plain``: this image's plasma colour plus mild noise;
* ``synthetic``: a smear field of red cells and platelets without white cells, drawn by
  :func:`leukolab.data.synthetic.smears.render_smear` (a few dozen are cached per process), scaled so
  its red cells are about half a white cell wide;
* ``removed``: the "background removed" copy -- the cell on a flat fill of its plasma colour;
* ``mixed`` (default): one of the four, equally likely, per image.

The paste is hard (no blending at the mask's edge), so the cell's pixels are unchanged.
No library offers this (torchvision/timm have no mask-aware transforms); it is a few numpy lines.
Random draws come from torch's global generator, so ``torch.manual_seed`` and the loader's worker
seeding control them as for torchvision transforms.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image

from leukolab.data.crops import random_squares
from leukolab.data.preprocess import MASK_BACKGROUNDS, estimate_mask
from leukolab.errors import LeukolabError

__all__ = ["BACKGROUND_KINDS", "MASK_BACKGROUNDS", "BackgroundSource", "MaskPaste", "plasma_colour"]

#: the backgrounds ``mixed`` draws from
BACKGROUND_KINDS = ("other", "plain", "synthetic", "removed")
_NOISE_SD = 3.0  # grey levels of the "mild noise" on painted backgrounds
_RBC_PER_CELL = 0.275  # red-cell radius / white-cell box side (RBC ~7.5 um, WBC ~12-15 um across)
_SYN_SIDE = 160  # side of a cached synthetic field
_SYN_RBC = 9.0  # red-cell radius in a cached synthetic field (px): small, so white-cell-free squares exist


class BackgroundSource(Protocol):
    """Training images to borrow backgrounds from (:class:`~leukolab.data.dataset.ImageDataset` is one)."""

    def __len__(self) -> int: ...

    def pair(self, i: int) -> tuple[Image.Image, np.ndarray | None]:
        """Image ``i`` and its cell mask (``None``: not known)."""
        ...


def plasma_colour(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The median colour (float, per channel) of the pixels outside ``mask`` (of all pixels if none are)."""
    outside = arr[~mask]
    return np.median(outside if len(outside) else arr.reshape(-1, 3), axis=0).astype(np.float64)


def _noisy_fill(shape: tuple[int, ...], colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(colour + rng.normal(0.0, _NOISE_SD, (*shape[:2], 3)), 0, 255).round().astype(np.uint8)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


class MaskPaste:
    """With probability ``p``, the cell (by its mask) on a new background; its own pixels unchanged.

    Args:
        p: probability of replacing the background of an image.
        sources: the training images ``other`` borrows backgrounds from (None or fewer than 2: ``plain``).
        mode: one of :data:`MASK_BACKGROUNDS` (``mixed``: any of :data:`BACKGROUND_KINDS` per image).
        n_synthetic: synthetic smear fields drawn (once, lazily) and reused.
        seed: seed of the synthetic fields.
    """

    def __init__(self, p: float, sources: BackgroundSource | None = None, mode: str = "mixed",
                 n_synthetic: int = 16, seed: int = 0) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise LeukolabError(f"--mask-aug {p}: expected a probability in [0, 1]")
        if mode not in MASK_BACKGROUNDS:
            raise LeukolabError(f"--mask-bg {mode!r}: expected one of {', '.join(MASK_BACKGROUNDS)}")
        self.p, self.sources, self.mode = float(p), sources, mode
        self.n_synthetic, self.seed = int(n_synthetic), int(seed)
        self._fields: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return f"MaskPaste(p={self.p}, mode={self.mode!r})"

    def __call__(self, image: Image.Image, mask: np.ndarray | None = None) -> Image.Image:
        """``image`` with its background replaced (probability ``p``); ``mask`` None: estimated."""
        if self.p <= 0.0 or float(torch.rand(1)) >= self.p:
            return image
        return self.paste(image, mask)

    def paste(self, image: Image.Image, mask: np.ndarray | None = None, kind: str | None = None) -> Image.Image:
        """``image``'s cell on a new background of ``kind`` (default: by :attr:`mode`), always.

        An image whose mask is empty (no cell found) comes back unchanged.
        """
        arr = np.asarray(image.convert("RGB"))
        mask = estimate_mask(image) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != arr.shape[:2]:
            raise LeukolabError(f"mask of shape {mask.shape} for an image of {arr.shape[1]}x{arr.shape[0]} px; "
                                "expected the image's size")
        if not mask.any():
            return image
        rng = np.random.default_rng(_seed())
        kind = kind or self.mode
        if kind == "mixed":
            kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        bg = self.background(kind, arr, mask, rng)
        return Image.fromarray(np.where(mask[..., None], arr, bg))

    def background(self, kind: str, arr: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A background of ``kind`` the size of ``arr`` (uint8 H, W, 3)."""
        if kind == "other" and self.sources is not None and len(self.sources) > 1:
            return self._other(arr.shape, rng)
        if kind == "synthetic":
            return self._synthetic(arr.shape, mask, rng)
        colour = plasma_colour(arr, mask)
        if kind == "removed":
            return np.broadcast_to(colour.round().astype(np.uint8), arr.shape)
        return _noisy_fill(arr.shape, colour, rng)  # plain (and "other" without sources)

    def _other(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        assert self.sources is not None
        other, other_mask = self.sources.pair(int(rng.integers(len(self.sources))))
        other = other.convert("RGB")
        o = np.asarray(other)
        m = estimate_mask(other) if other_mask is None else np.asarray(other_mask, dtype=bool)
        if m.any():  # its cell painted over (slightly grown: its soft edge goes too)
            grown = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
                (max(1, other.width // 4), max(1, other.height // 4)), Image.Resampling.BILINEAR).resize(
                other.size, Image.Resampling.BILINEAR)) > 0
            grown |= m
            o = o.copy()
            o[grown] = _noisy_fill(o.shape, plasma_colour(o, grown), rng)[grown]
        if o.shape[:2] != shape[:2]:
            o = np.asarray(Image.fromarray(o).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
        return o

    def _synthetic(self, shape: tuple[int, ...], mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        fields = self._synthetic_fields()
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        cell_side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        # the field's px per image px, so that its red cells are _RBC_PER_CELL of the cell's side
        zoom = _SYN_RBC / (_RBC_PER_CELL * cell_side)
        side = int(np.clip(round(max(shape[:2]) * zoom), 8, _SYN_SIDE))
        first = int(rng.integers(len(fields)))
        for k in range(len(fields)):  # a square without white cells, from a random field on
            field, wbc_boxes = fields[(first + k) % len(fields)]
            squares = random_squares(_SYN_SIDE, _SYN_SIDE, side, wbc_boxes, 1, rng, tries=20)
            if squares:
                x1, y1, x2, y2 = squares[0]
                patch = Image.fromarray(field[y1:y2, x1:x2])
                return np.asarray(patch.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
        return _noisy_fill(shape, np.median(fields[first][0].reshape(-1, 3), axis=0), rng)  # crowded: plain

    def _synthetic_fields(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._fields is None:
            from leukolab.data.synthetic.smears import _RBC_RADIUS, render_smear

            out = []
            for k in range(max(1, self.n_synthetic)):
                img, boxes = render_smear(_SYN_SIDE, _SYN_SIDE, np.random.default_rng([self.seed, 3000, k]),
                                          difficulty=0.3, scale=_SYN_RBC / _RBC_RADIUS)
                wbc = np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes if b.label == "wbc"], dtype=np.float64)
                out.append((img, wbc.reshape(-1, 4)))
            self._fields = out
        return self._fields

    def __getstate__(self) -> dict[str, object]:  # loader workers draw their own fields (not pickled)
        state = dict(self.__dict__)
        state["_fields"] = None
        return state
