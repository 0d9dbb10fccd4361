"""A classifier run's image options (``data:`` crop, masks, stain and background augmentation) as datasets.

:class:`ImageOptions` turns the resolved options into the run's training and evaluation
:class:`~leukolab.data.dataset.ImageDataset`\\ s, in the order the options are applied to a training
image::

    decode -> [cell mask: file or estimated] -> [crop to the cell] -> shrink to 2 x img_size   (once, cached)
    -> [mask paste: new background] -> [stain normalise] -> [HED stain jitter] -> [degrade]
    -> random crop / flips / rotations / colour jitter -> tensor                                 (every epoch)

Without mask paste the stain normalisation is deterministic and moves into the cached part. Evaluation
images get the run's :class:`~leukolab.data.preprocess.EvalPreprocess` (crop to the estimated cell,
shrink, normalise; cached) and the plain resize, as :func:`~leukolab.data.preprocess.run_preprocess`
rebuilds it for ``evaluate`` / ``predict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from leukolab.data.dataset import ImageDataset
from leukolab.data.mask_aug import MaskPaste
from leukolab.data.masks import default_masks_dir, find_masks, load_mask
from leukolab.data.preprocess import FIT_IMAGES, CellPrep, EvalPreprocess, fit_stain_norm, make_preprocess, option
from leukolab.data.stain import StainNormaliser
from leukolab.data.transforms import eval_transform, train_transform

__all__ = ["ImageOptions", "check_mask_sizes", "masks_folder"]


def masks_folder(cfg_data: Mapping[str, Any]) -> Path | None:
    """The mask folder of a run: ``masks`` when set, else a ``masks/`` folder beside the class folders of
    ``path`` (:func:`~leukolab.data.masks.default_masks_dir`), else None."""
    if cfg_data.get("masks"):
        return Path(cfg_data["masks"])
    return default_masks_dir(cfg_data["path"]) if cfg_data.get("path") else None


def _size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError:
        return None  # unreadable: the image check or load_mask names it


def check_mask_sizes(mask_files: Mapping[Path, Path]) -> None:
    """Every mask the size of its image (file headers only), before a run folder is made.

    Raises:
        LeukolabError: from :func:`~leukolab.data.masks.load_mask`, naming the first mask and image that differ.
    """
    for image, mask in mask_files.items():
        size = _size(image)
        if size is not None and _size(mask) != size:
            load_mask(mask, size, image)


@dataclass
class ImageOptions:
    """The image options of a run, resolved for its loaders (all off: the plain resize-and-augment pipeline).

    Attributes:
        cfg_data: the run's ``data:`` config (``crop``, ``crop_margin``, ``stain_aug``, ``degrade``,
            ``jitter``, ``mask_aug``, ``mask_bg``, ``img_size`` ...).
        mask_files: the mask file of each training image that has one (the others are estimated).
        normaliser: the fitted stain normaliser (``stain_norm``), or None.
        seed: seed of the synthetic backgrounds.
    """

    cfg_data: Mapping[str, Any] = field(default_factory=dict)
    mask_files: dict[Path, Path] = field(default_factory=dict)
    normaliser: StainNormaliser | None = None
    seed: int = 0

    def get(self, key: str) -> Any:
        return option(dict(self.cfg_data), key)

    @property
    def crop_margin(self) -> float | None:
        return float(self.get("crop_margin")) if self.get("crop") == "cell" else None

    @property
    def mask_aug(self) -> float:
        return float(self.get("mask_aug"))

    @property
    def uses_masks(self) -> bool:
        """Whether training needs cell masks (a cell crop or background replacement)."""
        return self.crop_margin is not None or self.mask_aug > 0

    @classmethod
    def for_run(cls, cfg_data: Mapping[str, Any], train_paths: Sequence[Path], seed: int = 0) -> ImageOptions:
        """The options of a run's config, with the mask files of its training images looked up (in ``masks`` or
        the default ``masks/`` folder) when a crop or mask augmentation needs them; no normaliser yet."""
        opts = cls(dict(cfg_data), seed=seed)
        folder = masks_folder(cfg_data) if opts.uses_masks else None
        if folder is not None:
            roots = [Path(cfg_data["path"]), folder.parent] if cfg_data.get("path") else None
            found = find_masks(list(train_paths), folder, roots)
            opts.mask_files = {Path(p): m for p, m in zip(train_paths, found, strict=True) if m is not None}
            check_mask_sizes(opts.mask_files)
        return opts

    def with_normaliser(self, normaliser: StainNormaliser | None) -> ImageOptions:
        return replace(self, normaliser=normaliser)

    def eval_preprocess(self) -> EvalPreprocess | None:
        """The evaluation preprocessing (what :func:`~leukolab.data.preprocess.run_preprocess` rebuilds)."""
        return make_preprocess(dict(self.cfg_data), self.normaliser)

    def _cells(self, paths: Sequence[Path], with_normaliser: bool) -> CellPrep | None:
        keep_mask = self.mask_aug > 0
        after = self.normaliser if with_normaliser and not keep_mask else None
        if self.crop_margin is None and not keep_mask and after is None:
            return None
        masks = [self.mask_files.get(Path(p)) for p in paths] if self.mask_files else None
        return CellPrep(masks, self.crop_margin, keep_mask, after)

    def train_dataset(self, paths: Sequence[Path], targets: Sequence[int] | None, augment: bool = True,
                      cache: bool = False) -> ImageDataset:
        """The training dataset: cell work and shrink at decode time, the augmentations per sample."""
        img_size = int(self.cfg_data.get("img_size", 64))
        cells = self._cells(paths, with_normaliser=True)
        per_sample_norm = self.normaliser if self.mask_aug > 0 else None
        tf = train_transform(img_size, augment, stain_aug=float(self.get("stain_aug")),
                             degrade=float(self.get("degrade")), jitter=float(self.get("jitter")),
                             stain_norm=per_sample_norm)
        ds = ImageDataset(paths, targets, tf, cache=cache, max_side=2 * img_size, cells=cells)
        if self.mask_aug > 0:
            ds.paired = MaskPaste(self.mask_aug, ds, str(self.get("mask_bg")), seed=self.seed)
        return ds

    def eval_dataset(self, paths: Sequence[Path], targets: Sequence[int] | None, cache: bool = False) -> ImageDataset:
        """A validation / test dataset: the run's evaluation preprocessing (cached), resize, normalise."""
        img_size = int(self.cfg_data.get("img_size", 64))
        return ImageDataset(paths, targets, eval_transform(img_size), cache=cache, max_side=2 * img_size,
                            prepare=self.eval_preprocess())

    def fit_images(self, paths: Sequence[Path]) -> list[Image.Image]:
        """Up to 64 training images spread over ``paths``, prepared as training prepares them (crop, shrink)
        but not normalised: what a stain normaliser is fitted on by default."""
        spread = list(paths)[:: max(1, len(paths) // FIT_IMAGES)][:FIT_IMAGES]
        img_size = int(self.cfg_data.get("img_size", 64))
        ds = ImageDataset(spread, None, None, max_side=2 * img_size, cells=self._cells(spread, False))
        return [ds.image(i) for i in range(len(ds))]

    def fitted(self, paths: Sequence[Path]) -> ImageOptions:
        """These options with ``stain_norm`` fitted on ``stain_ref`` or else on the training ``paths``."""
        name = str(self.get("stain_norm")).lower()
        if name == "none":
            return self
        ref = self.cfg_data.get("stain_ref")
        images = None if ref else self.fit_images(paths)
        return self.with_normaliser(fit_stain_norm(name, images, ref, max_side=2 * int(self.cfg_data["img_size"])))
