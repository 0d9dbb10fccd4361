"""Image transforms for WBC crops (cells have no preferred orientation)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from leukolab.checkpoints import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from leukolab.checkpoints import LEUKOLAB_MEAN as MEAN
from leukolab.checkpoints import LEUKOLAB_STD as STD
from leukolab.data.stain import HEDJitter, RandomDegrade
from leukolab.errors import LeukolabError

#: input normalisations by name: ``leukolab`` (every leukolab-trained model) and
#: ``imagenet`` (released DINOv2 / DinoBloom / timm / HF ViTMAE weights)
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "leukolab": (MEAN, STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


#: a normalisation: a key of :data:`NORMALISATIONS`, or explicit ``(mean, std)`` per channel
Normalisation = str | tuple[Sequence[float], Sequence[float]]


def check_normalisation(name: str) -> str:
    """``name`` if it is a known normalisation, else a one-line error."""
    if name not in NORMALISATIONS:
        raise LeukolabError(f"normalisation {name!r} is unknown; expected one of {', '.join(NORMALISATIONS)}")
    return name


def mean_std(norm: Normalisation) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a normalisation name or of an explicit ``(mean, std)`` pair."""
    if isinstance(norm, str):
        return NORMALISATIONS[check_normalisation(norm)]
    mean, std = (tuple(float(v) for v in part) for part in norm)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise LeukolabError(f"normalisation mean {mean} / std {std}: expected 3 means and 3 positive stds")
    return mean, std


def eval_transform(img_size: int, norm: Normalisation = "leukolab") -> v2.Compose:
    """Resize to ``img_size`` and normalise (``norm``: a key of :data:`NORMALISATIONS` or ``(mean, std)``)."""
    mean, std = mean_std(norm)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((img_size, img_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def train_transform(
    img_size: int, augment: bool = True, *, stain_aug: float = 0.0, degrade: float = 0.0, jitter: float = 0.1,
    stain_norm: Callable[[Image.Image], Image.Image] | None = None,
) -> v2.Compose:
    """The training transform of a PIL image: ``stain_norm`` (a fitted stain normaliser), then with
    probability ``stain_aug`` a stain jitter in optical density (:class:`~leukolab.data.stain.HEDJitter`)
    and with probability ``degrade`` a blur / down-up scaling (:class:`~leukolab.data.stain.RandomDegrade`),
    then (``augment``) random crop, flips, 90-degree rotations and colour jitter of strength ``jitter``
    (brightness, contrast and saturation +-``jitter``, hue +-``jitter / 5``), then normalise."""
    pil: list[Callable[[Image.Image], Image.Image]] = []
    if stain_norm is not None:
        pil.append(stain_norm)
    if stain_aug > 0:
        pil.append(HEDJitter(p=stain_aug))
    if degrade > 0:
        pil.append(RandomDegrade(p=degrade))
    if not augment:
        return v2.Compose([*pil, *eval_transform(img_size).transforms])
    geometric = [
        v2.ToImage(),
        v2.RandomResizedCrop((img_size, img_size), scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
    ]
    colour = [v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 5)] if jitter else []
    return v2.Compose([*pil, *geometric, *colour, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def mae_transform(img_size: int) -> v2.Compose:
    """MAE pretraining augmentation: random resized crop (scale 0.2-1, as in the MAE paper), flips, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop((img_size, img_size), scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def denormalise(x: torch.Tensor, norm: Normalisation = "leukolab") -> torch.Tensor:
    """Undo :func:`eval_transform`'s normalisation (values clipped to [0, 1])."""
    m, s = mean_std(norm)
    mean = torch.tensor(m, device=x.device).view(-1, 1, 1)
    std = torch.tensor(s, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def release_eval_transform(
    img_size: int, norm: Normalisation = "imagenet", *, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> v2.Compose:
    """The evaluation preprocessing of released weights (DINOv2's ``make_classification_eval_transform``,
    timm's ``crop_pct``): resize the short side to ``floor(img_size / crop_pct)`` (256 for 224 at 0.875)
    with ``interpolation``, keep the centre ``img_size`` square, normalise. ``crop_pct=1`` resizes the short
    side to ``img_size`` and crops only a non-square image. A :class:`~leukolab.checkpoints.BackboneSpec`
    carries ``crop_pct`` and ``interpolation``; ``crop_pct == 1`` with ``bilinear`` is :func:`eval_transform`.
    """
    if not 0 < crop_pct <= 1:
        raise LeukolabError(f"crop_pct {crop_pct!r} must be in (0, 1]")
    if interpolation not in ("bilinear", "bicubic"):
        raise LeukolabError(f"interpolation {interpolation!r}: expected bilinear or bicubic")
    mean, std = mean_std(norm)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(math.floor(img_size / crop_pct), interpolation=v2.InterpolationMode(interpolation),
                      antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


#: how a model's evaluation images are prepared: ``release`` = the weights' own recipe (e.g. DINOv2's
#: resize 256 bicubic + centre crop 224, recorded in its :class:`BackboneSpec`), ``resize`` = the whole image
PREPROCESSING = ("release", "resize")


def model_eval_transform(
    img_size: int, norm: Normalisation, spec: BackboneSpec | None = None, preprocess: str = "release"
) -> v2.Compose:
    """The evaluation transform of a model described by ``spec``.

    ``preprocess="release"`` (default) uses the recipe the spec records (``crop_pct`` < 1 or bicubic:
    :func:`release_eval_transform`); ``resize``, a spec without one, or no spec: :func:`eval_transform`.
    """
    if preprocess not in PREPROCESSING:
        raise LeukolabError(f"--preprocess {preprocess!r}: expected one of {', '.join(PREPROCESSING)}")
    if preprocess == "release" and spec is not None and (spec.crop_pct < 1 or spec.interpolation != "bilinear"):
        return release_eval_transform(img_size, norm, crop_pct=spec.crop_pct, interpolation=spec.interpolation)
    return eval_transform(img_size, norm)
