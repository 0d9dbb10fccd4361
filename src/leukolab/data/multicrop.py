"""Multi-crop views for DINO: 2 global crops and ``n_local`` smaller local crops per image.

:class:`MultiCropTransform` turns one PIL image into a list of normalised
tensors ``[global_1, global_2, local_1, ..., local_n]``; with
:class:`leukolab.data.dataset.ImageDataset` and the default collate a batch is
``([G1 (B,3,S,S), G2, L1 (B,3,s,s), ...], targets)``.

Augmentations follow DINO (Caron et al. 2021): random resized crops (global
scale (0.4, 1), local (0.1, 0.4)), flips -- vertical too, cells have no
orientation -- colour jitter (p 0.8), grey scale (p 0.2), Gaussian blur (p 1.0
on the first global crop, 0.1 on the second, 0.5 on local crops) and
solarisation (p 0.2, second global crop only). Blur kernel and sigma range are
scaled from DINO's 224 px values to the crop size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from leukolab.data.transforms import MEAN, STD
from leukolab.errors import LeukolabError


def _view(size: int, scale: Sequence[float], blur_p: float, solarize_p: float, jitter: float) -> v2.Compose:
    kernel = max(3, (size // 10) | 1)  # odd, ~10 % of the crop as in DINO (23 px at 224)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    if jitter > 0:
        steps += [
            v2.RandomApply([v2.ColorJitter(0.4 * jitter, 0.4 * jitter, 0.2 * jitter, 0.1 * jitter)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, max(0.2, 2.0 * size / 224)))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class MultiCropTransform:
    """PIL image -> ``[global_1, global_2, local_1, ..., local_n]`` normalised tensors."""

    def __init__(
        self,
        global_size: int = 64,
        local_size: int = 32,
        n_local: int = 4,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.1, 0.4),
        jitter: float = 1.0,
    ) -> None:
        if int(n_local) < 0:
            raise LeukolabError(f"local crops {n_local} must be >= 0")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.global_1 = _view(global_size, global_scale, 1.0, 0.0, jitter)
        self.global_2 = _view(global_size, global_scale, 0.1, 0.2, jitter)
        self.local = _view(local_size, local_scale, 0.5, 0.0, jitter)

    @property
    def n_views(self) -> int:
        """Views per image (2 global + local)."""
        return 2 + self.n_local

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global_1(img), self.global_2(img), *(self.local(img) for _ in range(self.n_local))]
