"""The deterministic image preprocessing of a classifier run: cell-centred crops and stain normalisation.

What a run does to an image before its resize and normalisation is decided by its ``data:`` config
(``crop``, ``crop_margin``, ``stain_norm``) and, for stain normalisation, by the reference fitted at
training time and stored in the run folder as ``stain_norm.yaml``. :func:`run_preprocess` rebuilds that
step from a run, so training's validation loader, ``evaluate``, ``predict``, ensemble members and
``smear analyse`` all prepare images the same way:

1. ``crop: cell``: the cell's mask (a given mask file at training time, else estimated by
   :func:`leukolab.data.masks.segment_cell`) gives its box; the image is cut to the square around that
   box enlarged by ``crop_margin`` x the box side on each side (:func:`leukolab.data.crops.square_around`,
   mirrored at the image borders), so a cell fills the same share of the crop whatever the
   magnification or field size.
2. the result is shrunk to at most twice the training size (:func:`leukolab.data.dataset.shrink`);
3. ``stain_norm: reinhard | macenko``: colours mapped onto the run's reference
   (:mod:`leukolab.data.stain`).

At training time a given mask that is empty is an error; a mask *estimated* as empty (an odd image)
keeps the whole image, counted and warned about, so one image does not stop a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from leukolab.data.crops import crop_square, square_around
from leukolab.data.dataset import load_rgb, shrink
from leukolab.data.masks import load_mask, mask_box, segment_cell
from leukolab.data.readers import expand_image_inputs
from leukolab.data.stain import StainNormaliser, build_normaliser
from leukolab.errors import LeukolabError
from leukolab.utils.files import write_text

__all__ = [
    "CROP_MODES",
    "SEG_SIDE",
    "STAIN_NORM_FILE",
    "CellCrop",
    "CellPrep",
    "EvalPreprocess",
    "check_image_options",
    "crop_pair",
    "crop_to_cell",
    "estimate_mask",
    "fallbacks_reported_by_caller",
    "fit_stain_norm",
    "load_stain_norm",
    "make_preprocess",
    "run_preprocess",
    "save_stain_norm",
]

#: values of ``data.crop``
CROP_MODES = ("none", "cell")
#: the file in a run folder that holds its fitted stain normaliser
STAIN_NORM_FILE = "stain_norm.yaml"
#: masks are estimated on the image shrunk to this longer side (then scaled back up): fast on big crops
SEG_SIDE = 256
#: how many training images (spread over the set) a stain normaliser is fitted on by default
FIT_IMAGES = 64
#: the values of ``data.mask_bg`` (checked here so a bad value fails before anything is written)
MASK_BACKGROUNDS = ("other", "plain", "synthetic", "removed", "mixed")
#: the defaults of the image options, for run configs written before they existed
IMAGE_DEFAULTS: dict[str, Any] = {"masks": None, "crop": "none", "crop_margin": 0.15, "stain_aug": 0.0,
                                  "jitter": 0.1, "degrade": 0.0, "stain_norm": "none", "stain_ref": None,
                                  "mask_aug": 0.0, "mask_bg": "mixed"}


def option(cfg_data: dict[str, Any], key: str) -> Any:
    """``cfg_data[key]``, or its default when a run's config predates it (:data:`IMAGE_DEFAULTS`)."""
    value = cfg_data.get(key)
    return IMAGE_DEFAULTS[key] if value is None else value


# --------------------------------------------------------------------------- options
def _probability(name: str, value: Any) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise LeukolabError(f"{name} {value!r}: expected a probability in [0, 1]") from None
    if not 0.0 <= p <= 1.0:
        raise LeukolabError(f"{name} {value!r}: expected a probability in [0, 1]")
    return p


def check_image_options(d: dict[str, Any]) -> None:
    """Check the image options of a ``data:`` config in place (names lower-cased, paths made absolute).

    Raises:
        LeukolabError: an unknown ``crop`` / ``stain_norm`` / ``mask_bg``, a probability outside [0, 1], a
            negative margin, a ``stain_ref`` that is neither an image nor a folder of images, or a ``masks``
            folder that does not exist.
    """
    crop = str(option(d, "crop")).strip().lower()
    if crop not in CROP_MODES:
        raise LeukolabError(f"--crop {crop!r}: expected one of {', '.join(CROP_MODES)}")
    d["crop"] = crop
    margin = float(option(d, "crop_margin"))
    if not margin >= 0 or margin > 10:
        raise LeukolabError(f"--crop-margin {margin}: expected a fraction of the cell box side in [0, 10]")
    d["crop_margin"] = margin
    for key, flag in (("stain_aug", "--stain-aug"), ("degrade", "--degrade"), ("mask_aug", "--mask-aug")):
        d[key] = _probability(flag, option(d, key))
    jitter = float(option(d, "jitter"))
    if not 0.0 <= jitter <= 1.0:
        raise LeukolabError(f"data.jitter {jitter}: expected a colour-jitter strength in [0, 1]")
    d["jitter"] = jitter
    norm = str(option(d, "stain_norm")).strip().lower()
    build_normaliser(norm)  # an unknown name fails here
    d["stain_norm"] = norm
    bg = str(option(d, "mask_bg")).strip().lower()
    if bg not in MASK_BACKGROUNDS:
        raise LeukolabError(f"--mask-bg {bg!r}: expected one of {', '.join(MASK_BACKGROUNDS)}")
    d["mask_bg"] = bg
    if d.get("stain_ref"):
        ref = Path(d["stain_ref"])
        if not ref.exists():
            raise LeukolabError(f"--stain-ref {ref} does not exist; expected a reference image or a folder of them")
        if norm == "none":
            raise LeukolabError(f"--stain-ref {ref} needs --stain-norm reinhard or macenko")
        reference_images(ref)  # not an image / no images inside: fails here
        d["stain_ref"] = str(ref.resolve())
    if d.get("masks"):
        masks = Path(d["masks"])
        if not masks.is_dir():
            raise LeukolabError(f"--masks {masks}: not a folder; expected a folder of mask images")
        d["masks"] = str(masks.resolve())


def reference_images(ref: Path | str) -> list[Path]:
    """The images of ``--stain-ref``: one image file, or every image in a folder (recursive)."""
    try:
        return expand_image_inputs([Path(ref)])
    except LeukolabError as exc:
        raise LeukolabError(f"--stain-ref: {exc}") from None


# --------------------------------------------------------------------------- masks and crops
def estimate_mask(image: Image.Image) -> np.ndarray:
    """The cell mask of ``image`` (H, W bool) by :func:`~leukolab.data.masks.segment_cell`, computed on the
    image shrunk to :data:`SEG_SIDE` and scaled back up (nearest), all-False when no cell is found."""
    small = shrink(image.convert("RGB"), SEG_SIDE)
    mask = np.asarray(segment_cell(np.asarray(small)), dtype=bool)
    if small.size == image.size:
        return mask
    up = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    return np.asarray(up) > 127


def _cell_square(mask: np.ndarray, margin: float, source: str) -> tuple[int, int, int, int]:
    box = mask_box(mask)
    if box is None:
        raise LeukolabError(f"{source}: the cell mask is empty; expected a mask marking the cell (--crop cell)")
    return square_around(box, margin)


def crop_to_cell(image: Image.Image, mask: np.ndarray | None, margin: float,
                 source: Path | str | None = None) -> Image.Image:
    """The square around the cell's mask box, enlarged by ``margin`` x the box side on each side.

    Args:
        image: the RGB image.
        mask: its cell mask (H, W bool, the image's size); ``None``: estimated (:func:`estimate_mask`).
        margin: the fraction of the box side added on each side (0.15: the cell spans ~77 % of the crop).
        source: the image's name for the error message.

    Raises:
        LeukolabError: the mask (given or estimated) is empty, naming ``source``.
    """
    image = image.convert("RGB")
    mask = estimate_mask(image) if mask is None else np.asarray(mask, dtype=bool)
    square = _cell_square(mask, margin, str(source or "image"))
    return Image.fromarray(crop_square(np.asarray(image), square, pad="reflect"))


def crop_pair(image: Image.Image, mask: np.ndarray, margin: float,
              source: Path | str | None = None) -> tuple[Image.Image, np.ndarray]:
    """:func:`crop_to_cell` of ``image`` and the same crop of its ``mask`` (mirrored alike at the borders)."""
    mask = np.asarray(mask, dtype=bool)
    square = _cell_square(mask, margin, str(source or "image"))
    return (Image.fromarray(crop_square(np.asarray(image.convert("RGB")), square, pad="reflect")),
            crop_square(mask, square, pad="reflect"))


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


_WHOLE_WARNING = "no cell found; the whole image is used"


def _warn_whole(count: int, source: str) -> None:
    if count == 1:  # once per process; the total is reported by the caller (CellCrop.fallbacks)
        warnings.warn(f"{source}: {_WHOLE_WARNING} (further such images are counted)", stacklevel=3)


@contextmanager
def fallbacks_reported_by_caller() -> Iterator[None]:
    """Silence :class:`CellCrop`'s once-per-process warning inside the block, for a caller that reports the
    whole count (:attr:`CellCrop.fallbacks`) itself in one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_WHOLE_WARNING}", category=UserWarning)
        yield


@dataclass
class CellCrop:
    """The evaluation-time cell crop: the estimated mask's box plus ``margin``; the whole image (counted in
    :attr:`fallbacks`, warned once) when no cell is found."""

    margin: float
    fallbacks: int = 0

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        mask = estimate_mask(image)
        if mask_box(mask) is None:
            self.fallbacks += 1
            _warn_whole(self.fallbacks, f"an image of {image.width}x{image.height} px")
            return image
        return crop_to_cell(image, mask, self.margin)


@dataclass
class EvalPreprocess:
    """A run's preprocessing (cell crop, shrink to ``max_side``, stain normalisation) as one PIL -> PIL step."""

    crop: CellCrop | None
    max_side: int
    normaliser: StainNormaliser | None = None

    @property
    def fallbacks(self) -> int:
        """Images in which no cell was found (kept whole)."""
        return self.crop.fallbacks if self.crop is not None else 0

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if self.crop is not None:
            image = self.crop(image)
        image = shrink(image, self.max_side)
        return self.normaliser(image) if self.normaliser is not None else image


@dataclass
class CellPrep:
    """The decode-time work of a training set (done once per image; cached with the image by
    :class:`~leukolab.data.dataset.ImageDataset`): the cell mask, the cell crop, the shrink, and a
    deterministic step after them (``after``: the stain normaliser when no mask augmentation follows).

    ``masks``: a mask file (or ``None``: estimated) per dataset index; ``crop_margin``: crop to the cell
    (``None``: keep the whole image); ``keep_mask``: return the (cropped, shrunk) mask for a paired
    transform (:class:`~leukolab.data.mask_aug.MaskPaste`). Estimated masks are cached per image.
    """

    masks: Sequence[Path | None] | None = None
    crop_margin: float | None = None
    keep_mask: bool = False
    after: Callable[[Image.Image], Image.Image] | None = None
    fallbacks: int = 0
    _estimated: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def needs_mask(self) -> bool:
        return self.keep_mask or self.crop_margin is not None

    def mask(self, i: int, image: Image.Image, source: Path) -> tuple[np.ndarray, bool]:
        """The mask of image ``i`` at its size and whether it was given (a file) rather than estimated."""
        path = self.masks[i] if self.masks is not None else None
        if path is not None:
            return load_mask(path, image.size, source), True
        cached = self._estimated.get(i)
        if cached is not None and cached.shape == (image.height, image.width):
            return cached, False
        mask = estimate_mask(image)
        self._estimated[i] = mask
        return mask, False

    def __call__(self, i: int, image: Image.Image, max_side: int | None, source: Path) -> tuple[
            Image.Image, np.ndarray | None]:
        """Image ``i`` (decoded, full size) prepared, and its mask when :attr:`keep_mask`."""
        mask: np.ndarray | None = None
        if self.needs_mask:
            mask, given = self.mask(i, image, source)
            if self.crop_margin is not None:
                if mask_box(mask) is not None:
                    image, mask = crop_pair(image, mask, self.crop_margin, source)
                elif given:
                    raise LeukolabError(f"{source}: its mask {self.masks[i]} is empty; "  # type: ignore[index]
                                        "expected a mask marking the cell (--crop cell)")
                else:
                    self.fallbacks += 1
                    _warn_whole(self.fallbacks, str(source))
        if max_side:
            image = shrink(image, max_side)
            if mask is not None:
                mask = _shrink_mask(mask, image.size)
        if self.after is not None:
            image = self.after(image)
        return image, (mask if self.keep_mask else None)


# --------------------------------------------------------------------------- stain normalisation of a run
def fit_stain_norm(name: str, images: Sequence[Image.Image] | None = None, ref: Path | str | None = None,
                   max_side: int = 2 * SEG_SIDE) -> StainNormaliser | None:
    """The normaliser ``name`` fitted on ``ref`` (an image or up to 64 images of a folder, each shrunk to
    ``max_side``) when given, else on ``images`` (prepared training images); ``None`` for ``none``."""
    normaliser = build_normaliser(name)
    if normaliser is None:
        return None
    if ref:
        refs = reference_images(ref)
        spread = refs[:: max(1, len(refs) // FIT_IMAGES)][:FIT_IMAGES]
        return normaliser.fit([shrink(load_rgb(p), max_side) for p in spread])
    if not images:
        raise LeukolabError(f"--stain-norm {name}: no training images to fit it on; pass --stain-ref")
    return normaliser.fit(list(images))


def save_stain_norm(run_dir: Path, normaliser: StainNormaliser, reference: str) -> Path:
    """Write ``stain_norm.yaml`` (method, reference, fitted state) into a run folder (never over one)."""
    body = {"method": normaliser.name, "reference": reference, "state": normaliser.state()}
    path = Path(run_dir) / STAIN_NORM_FILE
    write_text(path, yaml.safe_dump(body, sort_keys=False))
    return path


def load_stain_norm(run_dir: Path | str | None, name: str) -> StainNormaliser | None:
    """The fitted normaliser a run stored in ``stain_norm.yaml`` (``name`` ``none``: None).

    Raises:
        LeukolabError: the file is missing or unreadable, or holds another method than ``name``.
    """
    if build_normaliser(name) is None:
        return None
    if run_dir is None:
        raise LeukolabError(f"stain_norm {name}: no run folder to read its {STAIN_NORM_FILE} from")
    path = Path(run_dir) / STAIN_NORM_FILE
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LeukolabError(f"{path}: cannot read the run's stain normaliser ({exc.__class__.__name__}); expected "
                            f"the {STAIN_NORM_FILE} that leukolab train writes with --stain-norm {name}") from None
    if not isinstance(body, dict) or body.get("method") != name or not isinstance(body.get("state"), dict):
        raise LeukolabError(f"{path}: expected method {name!r} and its state, as leukolab train writes")
    return build_normaliser(name, body["state"])


def make_preprocess(cfg_data: dict[str, Any], normaliser: StainNormaliser | None) -> EvalPreprocess | None:
    """The evaluation preprocessing of ``cfg_data`` with a fitted ``normaliser`` (None when there is none)."""
    crop = str(option(cfg_data, "crop")).lower()
    if crop not in CROP_MODES:
        raise LeukolabError(f"crop {crop!r}: expected one of {', '.join(CROP_MODES)}")
    if crop == "none" and normaliser is None:
        return None
    cell = CellCrop(float(option(cfg_data, "crop_margin"))) if crop == "cell" else None
    return EvalPreprocess(cell, 2 * int(cfg_data["img_size"]), normaliser)


def run_preprocess(cfg_data: dict[str, Any], run_dir: Path | str | None) -> EvalPreprocess | None:
    """The evaluation-time preprocessing of a run (``cfg_data``: its ``data:`` config), PIL -> PIL, or None.

    ``crop: cell`` crops to the estimated cell (:class:`CellCrop`), the image is shrunk to twice
    ``img_size``, and ``stain_norm`` applies the normaliser stored in ``run_dir/stain_norm.yaml``. A config
    written before these options existed gives None (the run's behaviour then).
    """
    normaliser = load_stain_norm(run_dir, str(option(cfg_data, "stain_norm")).lower())
    return make_preprocess(cfg_data, normaliser)


def fallback_count(preprocess: Any) -> int:
    """Images a preprocessing kept whole because no cell was found in them (0 for anything else)."""
    return int(getattr(preprocess, "fallbacks", 0) or 0)
