"""Cell masks: a classical segmentation of the stained white cell in a crop, and mask files beside a data set.

:func:`segment_cell` finds the white blood cell at (or nearest) the centre of a
crop such as PBC's 360x363 images, BCCD-style crops or ``leukolab synth wbc``
cells, with nothing but colour thresholds and morphology (numpy +
scipy.ndimage; no scikit-image or OpenCV):

1. work on a copy downscaled to at most :data:`WORK_SIDE` pixels a side, in
   optical density (OD = -log(I / 255) per channel, Beer-Lambert: stains add);
2. nucleus = pixels whose "purple" score ``2 * OD_G - OD_B`` (haematoxylin /
   azure absorb green far more than blue; eosin-stained red cells do not) lies
   above an Otsu threshold of this image; the component group (lobes of one
   nucleus, joined by a small dilation) at or nearest the centre is kept;
3. the cell = the nucleus and the pixels around it (up to 1.5 nucleus radii)
   whose colour (OD and OD direction) is nearest the cytoplasm's (sampled in a
   ring around the nucleus) or the nucleus', rather than the background's (the
   palest pixels) or the red cells' (dense pixels far from the nucleus); then
   closed, holes filled, opened with a disk of ~0.45 cell radii (cuts red cells
   that touch it), the part holding the nucleus kept, and upsampled.

It returns all-False when nothing stained is found and never raises on odd
input. The scikit-image / OpenCV stacks have the same building blocks
(``threshold_otsu``, ``remove_small_objects``) but are heavy dependencies for
~10 short lines; ``scipy.ndimage`` is already one.

Mask files: ``leukolab synth wbc`` writes ``masks/<class>/<name>.png`` (L mode,
0/255) beside the class folders; :func:`default_masks_dir` finds that folder,
:func:`find_masks` pairs images with mask files and :func:`load_mask` reads one,
checking its size against the image's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from leukolab.errors import LeukolabError

__all__ = [
    "MASK_EXTENSIONS",
    "WORK_SIDE",
    "default_masks_dir",
    "find_masks",
    "load_mask",
    "mask_box",
    "mask_iou",
    "optical_density",
    "otsu",
    "purple_score",
    "require_nonempty",
    "segment_cell",
]

#: the longest side the segmentation works at (larger crops are downscaled, the mask upsampled)
WORK_SIDE = 96
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif", ".webp")
_MIN_NUCLEUS_SCORE = 0.25  # mean purple score (OD units) below which a "nucleus" is only plasma or red cells
_MIN_BLUE_STAIN = 0.1  # nucleus stains absorb green more than blue by this much (OD); eosin and red cells do not
_MIN_CONTRAST = 0.08  # Otsu classes closer than this (OD units): a flat image, nothing stained in it
# tuned on 200 synthetic cells (exact masks) and by eye on PBC / BCCD crops; radii are in units of the nucleus'
# (hull) equivalent radius unless named otherwise
_DIRECTION_WEIGHT = 1.0  # weight of the OD direction (stain mix) against the OD itself in the colour features
_FAR = 1.2  # red cells are sampled beyond this distance from the nucleus
_RING = 0.25  # the cytoplasm is sampled in a ring this wide around the nucleus
_REACH = 1.5  # the cell extends at most this far beyond the nucleus
_OPEN = 0.25  # opening radius that cuts thin bridges ...
_CELL_OPEN = 0.45  # ... and, in units of the cell's own radius, red cells that touch it
_MIN_SEPARATION = 0.05  # a ring colour this close to plasma or red cells: no cytoplasm class (nucleus hull only)


# ---------------------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------------------


def _as_rgb(rgb: np.ndarray) -> np.ndarray | None:
    """``rgb`` as an (H, W, 3) float32 array in 0..255, or None when it is not an image."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[0] < 4 or a.shape[1] < 4 or a.shape[2] not in (1, 3, 4):
        return None
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[..., :3]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
    elif a.dtype.kind not in "iu":
        return None
    return np.clip(a.astype(np.float32), 0, 255)


def optical_density(x: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-log((I + 1) / 256)`` of an (H, W, 3) image of 0..255 values."""
    return -np.log((x + 1.0) / 256.0)


def purple_score(od: np.ndarray) -> np.ndarray:
    """``2 OD_G - OD_B`` of an optical-density image: high where a nucleus stain is, low on eosin and red cells."""
    return 2.0 * od[..., 1] - od[..., 2]


def otsu(values: np.ndarray, bins: int = 64) -> tuple[float, float]:
    """Otsu threshold of ``values`` and the distance between the two class means (0 for a flat array)."""
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return hi, 0.0
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = w0[-1] + hist[-1] - w0
    s0 = np.cumsum(hist * centres)[:-1]
    s1 = (hist * centres).sum() - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        m0, m1 = s0 / w0, s1 / w1
        between = w0 * w1 * (m0 - m1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    k = int(np.argmax(between))
    return float(edges[k + 1]), float(abs(np.nan_to_num(m1[k] - m0[k])))


def _dilate(mask: np.ndarray, r: float) -> np.ndarray:
    """Dilation by a disk of radius ``r`` (exact, via the Euclidean distance transform: fast for any radius)."""
    if r <= 0 or not mask.any() or mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= r


def _erode(mask: np.ndarray, r: float) -> np.ndarray:
    """Erosion by a disk of radius ``r`` (pixels beyond the image border count as inside)."""
    if r <= 0 or not mask.any() or mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask) > r


_CROSS = ndimage.generate_binary_structure(2, 1)


def _open(mask: np.ndarray, r: float) -> np.ndarray:
    if r <= 1:
        return ndimage.binary_opening(mask, structure=_CROSS)
    return _dilate(_erode(mask, r), r)


def _close(mask: np.ndarray, r: float) -> np.ndarray:
    if r <= 1:
        return ndimage.binary_closing(mask, structure=_CROSS, border_value=0)
    return _erode(_dilate(mask, r), r)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the image border filled."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ~np.isin(labels, border)


def _nearest_centre(labels: np.ndarray, n: int, sizes: np.ndarray, min_size: float) -> int:
    """Label (1..n) of the component at the image centre, else the big-enough one nearest it (0: none)."""
    h, w = labels.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    at_centre = labels[round(cy), round(cx)]
    if at_centre and sizes[at_centre - 1] >= min_size:
        return int(at_centre)
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        return 0
    closest = np.full(n + 1, np.inf)  # each component's pixel closest to the centre
    np.minimum.at(closest, labels[ys, xs], (ys - cy) ** 2 + (xs - cx) ** 2)
    closest[1:][sizes < min_size] = np.inf
    closest[0] = np.inf
    best = int(np.argmin(closest))
    return best if np.isfinite(closest[best]) else 0


def _features(od: np.ndarray) -> np.ndarray:
    """Per-pixel colour features: optical density and its direction (the stain mix, whatever its density)."""
    norm = np.linalg.norm(od, axis=-1, keepdims=True)
    return np.concatenate([od, _DIRECTION_WEIGHT * od / (norm + 0.15)], axis=-1)


def _segment_small(x: np.ndarray) -> np.ndarray:
    """The segmentation proper on a small (H, W, 3) float image; returns a bool mask of the same size."""
    h, w = x.shape[:2]
    empty = np.zeros((h, w), dtype=bool)
    od = ndimage.uniform_filter(optical_density(x), size=(3, 3, 1), mode="nearest")  # granules and noise
    purple = purple_score(od)
    t, contrast = otsu(purple)
    if contrast < _MIN_CONTRAST:
        return empty
    side = min(h, w)
    nucleus = _open(purple > t, 1.0)
    # lobes of one nucleus: group components a few pixels apart
    labels, n = ndimage.label(_dilate(nucleus, max(1.0, side * 0.03)))
    if n == 0:
        return empty
    sizes = np.asarray(ndimage.sum(nucleus, labels, index=np.arange(1, n + 1)))
    keep = _nearest_centre(labels, n, sizes, min_size=max(4.0, 0.15 * float(sizes.max())))
    if keep == 0:
        return empty
    nucleus &= labels == keep
    if not nucleus.any() or float(purple[nucleus].mean()) < _MIN_NUCLEUS_SCORE:
        return empty
    if float((od[..., 1] - od[..., 2])[nucleus].mean()) < _MIN_BLUE_STAIN:
        return empty  # the darkest thing is pink or red (red cells, eosin): no stained nucleus

    # colour classes: background (palest), red cells (dense, far from the nucleus), cytoplasm (ring), nucleus
    hull = _fill_holes(_close(nucleus, max(2.0, side * 0.04)))
    radius = float(np.sqrt(hull.sum() / np.pi))
    dist = ndimage.distance_transform_edt(~hull)
    feats = _features(od)
    density = od.sum(axis=2)
    outside = ~hull
    pale = outside & (density <= np.quantile(density, 0.25))
    centres = [np.median(feats[pale if pale.any() else outside], axis=0)]
    t_dense = otsu(density[outside])[0] if outside.sum() > 8 else float(density.max())
    far = (dist > _FAR * radius + 2) & (density > t_dense) & (purple <= t)
    if far.sum() >= 8:
        centres.append(np.median(feats[far], axis=0))
    ring = (dist > 0) & (dist <= max(2.0, _RING * radius)) & ~nucleus
    centres.append(np.median(feats[ring if ring.sum() >= 8 else nucleus], axis=0))
    centres.append(np.median(feats[nucleus], axis=0))
    c = np.stack(centres)  # (K, F): the last two are cytoplasm and nucleus
    if np.sqrt(((c[:-2] - c[-2]) ** 2).sum(-1)).min() < _MIN_SEPARATION:
        region = hull  # the ring is plasma or red cells: no cytoplasm beyond the nucleus' hull
    else:
        region = dist <= _REACH * radius + 2
    # nearest colour class; a pixel of the cytoplasm or nucleus class belongs to the cell
    nearest = np.argmin(((feats[region][:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    cell = np.zeros((h, w), dtype=bool)
    cell[region] = nearest >= len(c) - 2
    cell |= nucleus
    cell = _fill_holes(_close(cell, 1.0))
    cell_radius = float(np.sqrt(cell.sum() / np.pi))
    cell = _open(cell, max(1.0, _OPEN * radius, _CELL_OPEN * cell_radius)) | nucleus
    labels, n = ndimage.label(cell)
    if n == 0:
        return empty
    touching = np.unique(labels[nucleus & (labels > 0)])
    return _fill_holes(np.isin(labels, touching[touching > 0]))


def segment_cell(rgb: np.ndarray) -> np.ndarray:
    """Mask of the stained white cell at (or nearest) the centre of ``rgb``: nucleus and cytoplasm, holes filled.

    ``rgb`` is an (H, W, 3) uint8 image (grey, RGBA and 0..1 floats are
    accepted too). Returns an (H, W) bool mask, all False when no stained cell
    is found or the input is not an image; never raises.
    """
    arr = np.asarray(rgb) if rgb is not None else np.zeros((0, 0))
    shape = arr.shape[:2] if arr.ndim >= 2 else (0, 0)
    try:
        if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[2] != 3:
            x = _as_rgb(arr)
            if x is None:
                return np.zeros(shape, dtype=bool)
            arr = x.astype(np.uint8)
        h, w = arr.shape[:2]
        if min(h, w) < 4:
            return np.zeros(shape, dtype=bool)
        scale = min(1.0, WORK_SIDE / max(h, w))
        if scale < 1.0:
            small_size = (max(4, round(w * scale)), max(4, round(h * scale)))
            small = np.asarray(Image.fromarray(arr).resize(small_size, Image.Resampling.BOX), dtype=np.float32)
        else:
            small = arr.astype(np.float32)
        mask = _segment_small(small)
        if mask.shape != (h, w):
            up = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
            mask = np.asarray(up) >= 128
        return mask
    except (ValueError, IndexError, FloatingPointError, MemoryError):  # odd images: no mask rather than a crash
        return np.zeros(shape, dtype=bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` of the mask's True pixels (``x2``, ``y2`` exclusive), or None for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} and {b.shape}")
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum()) / union


def require_nonempty(mask: np.ndarray, image_path: Path | str) -> np.ndarray:
    """``mask`` itself, or a one-line :class:`LeukolabError` naming the image when the mask has no pixel."""
    if not np.asarray(mask, dtype=bool).any():
        raise LeukolabError(f"{image_path}: its cell mask is empty (no cell found); a cell crop needs the cell's mask "
                            "(give a mask file with --masks, or leave the image out)")
    return mask


# ---------------------------------------------------------------------------------------------------------------
# mask files
# ---------------------------------------------------------------------------------------------------------------


def load_mask(path: Path | str, size: tuple[int, int], image: Path | str | None = None) -> np.ndarray:
    """Read a mask file as a bool array of shape ``(height, width)``; pixels > 127 (grey level) are the cell.

    ``size`` is the image's ``(width, height)``, as PIL's ``Image.size``; a
    mask of another size raises a one-line :class:`LeukolabError` naming the
    mask, the image (when given) and both sizes. Unreadable files raise one too.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mask_size = im.size
            grey = im.getchannel("A") if im.mode in ("RGBA", "LA") and _alpha_only(im) else im.convert("L")
    except FileNotFoundError:
        raise LeukolabError(f"mask {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise LeukolabError(f"mask {path}: not a readable image ({exc.__class__.__name__})") from None
    width, height = int(size[0]), int(size[1])
    if mask_size != (width, height):
        of = f"image {image}" if image is not None else "its image"
        raise LeukolabError(f"mask {path} is {mask_size[0]}x{mask_size[1]} but {of} is {width}x{height} "
                            "(width x height); expected a mask of the image's size")
    return np.asarray(grey) > 127


def _alpha_only(im: Image.Image) -> bool:
    """True for a mask drawn in the alpha channel only (colour channels all one value)."""
    extrema = im.convert("RGB").getextrema()
    return all(lo == hi for lo, hi in extrema)


def default_masks_dir(data_root: Path | str) -> Path | None:
    """The ``masks/`` folder beside the class folders of ``data_root`` (as ``synth wbc`` writes), else None.

    For a CSV data set the folder beside the CSV is looked at; for a
    train/val/test folder, ``masks/`` in it or in its ``train/``.
    """
    root = Path(data_root)
    if root.is_file():
        root = root.parent
    for candidate in (root / "masks", root / "train" / "masks"):
        if candidate.is_dir() and any(p.is_file() for p in candidate.rglob("*")):
            return candidate
    return None


def _index_masks(masks_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Mask files by relative path without extension (lower case) and by stem (lower case)."""
    by_rel: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(masks_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in MASK_EXTENSIONS and not p.name.startswith("."):
            rel = p.relative_to(masks_dir).with_suffix("").as_posix().lower()
            by_rel.setdefault(rel, p)
            by_stem.setdefault(p.stem.lower(), []).append(p)
    return by_rel, by_stem


def find_masks(image_paths: Sequence[Path | str], masks_dir: Path | str,
               roots: Path | str | Sequence[Path | str] | None = None) -> list[Path | None]:
    """The mask file of each image (None where it has none), in the order of ``image_paths``.

    An image ``<root>/<class>/<name>.jpg`` matches ``<masks_dir>/<class>/<name>.<any image extension>``
    (its path relative to one of ``roots`` (a CSV file: its folder); by default ``masks_dir``'s parent,
    the layout ``synth wbc`` writes), else ``<masks_dir>/<parent folder>/<name>.*``,
    else a mask with the same stem when exactly one has it. Raises a one-line
    :class:`LeukolabError` naming the folder when it does not exist or when no
    image has a mask in it.
    """
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise LeukolabError(f"mask folder {masks_dir} does not exist; expected a folder of mask images")
    if roots is None:
        root_list = [masks_dir.parent]
    elif isinstance(roots, (str, Path)):
        root_list = [Path(roots)]
    else:
        root_list = [Path(r) for r in roots]
    root_list = [(r.parent if r.is_file() else r).resolve() for r in root_list]  # a CSV: its folder
    by_rel, by_stem = _index_masks(masks_dir)
    if not by_rel:
        raise LeukolabError(f"mask folder {masks_dir} holds no mask images; expected files ending in "
                            f"{', '.join(MASK_EXTENSIONS)}")
    found: list[Path | None] = []
    for image in image_paths:
        image = Path(image)
        keys = []
        resolved = image.resolve()
        for root in root_list:
            if resolved.is_relative_to(root):
                keys.append(resolved.relative_to(root).with_suffix("").as_posix().lower())
        keys.append(f"{image.parent.name}/{image.stem}".lower())
        match = next((by_rel[k] for k in keys if k in by_rel), None)
        if match is None:
            same_stem = by_stem.get(image.stem.lower(), [])
            match = same_stem[0] if len(same_stem) == 1 else None
        found.append(match)
    if image_paths and not any(m is not None for m in found):
        raise LeukolabError(f"mask folder {masks_dir}: no mask file matches any of the {len(image_paths)} images "
                            f"(e.g. {Path(image_paths[0]).name}); expected masks named like the images, "
                            "in the same class folders")
    return found
