"""Image transforms for WBC crops (cells have no preferred orientation)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from leukolab.checkpoints import IMAGENET_MEAN, IMAGENET_STD
from leukolab.checkpoints import LEUKOLAB_MEAN as MEAN
from leukolab.checkpoints import LEUKOLAB_STD as STD
from leukolab.errors import LeukolabError

#: input normalisations by name: ``leukolab`` (every leukolab-trained model) and
#: ``imagenet`` (released DINOv2 / DinoBloom / timm / HF ViTMAE weights)
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "leukolab": (MEAN, STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def check_normalisation(name: str) -> str:
    """``name`` if it is a known normalisation, else a one-line error."""
    if name not in NORMALISATIONS:
        raise LeukolabError(f"normalisation {name!r} is unknown; expected one of {', '.join(NORMALISATIONS)}")
    return name


def eval_transform(img_size: int, norm: str = "leukolab") -> v2.Compose:
    """Resize to ``img_size`` and normalise (``norm``: a key of :data:`NORMALISATIONS`)."""
    mean, std = NORMALISATIONS[check_normalisation(norm)]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((img_size, img_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def train_transform(img_size: int, augment: bool = True) -> v2.Compose:
    """Random crop, flips, 90-degree rotations and mild colour jitter, then normalise."""
    if not augment:
        return eval_transform(img_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop((img_size, img_size), scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def denormalise(x: torch.Tensor, norm: str = "leukolab") -> torch.Tensor:
    """Undo :func:`eval_transform`'s normalisation (values clipped to [0, 1])."""
    m, s = NORMALISATIONS[check_normalisation(norm)]
    mean = torch.tensor(m, device=x.device).view(-1, 1, 1)
    std = torch.tensor(s, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)
