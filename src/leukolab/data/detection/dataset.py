"""A torch dataset over box-annotated fields and the collate function that batches them.

Items are ``(image, target)``: ``image`` a uint8 ``(3, H, W)`` tensor (the
detector normalises it), ``target`` a dict with ``boxes`` (float32 ``(N, 4)``
``x1, y1, x2, y2`` in the transformed image's pixels), ``labels`` (int64 class
indices), ``index`` (position in the dataset) and ``scale`` (transformed /
original size, to map predictions back). :func:`detection_collate` pads images
to a common size that is a multiple of ``size_divisible``; boxes need no change
because padding is added on the right and bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from leukolab.data.dataset import load_rgb
from leukolab.data.detection.formats import DetectionData
from leukolab.errors import LeukolabError

Target = dict[str, Any]


class DetectionDataset(Dataset):
    """``(uint8 image tensor, target)`` pairs of a :class:`DetectionData`, in ``classes`` order.

    With ``mosaic`` (a :class:`~leukolab.data.detection.transforms.Mosaic`), an item is, with the
    mosaic's probability, that field and three random others in one canvas (``mosaic`` then does
    the whole augmentation and ``transform`` is skipped; ``scale`` is NaN for such items).
    """

    def __init__(
        self,
        data: DetectionData,
        transform: Callable[..., Any] | None = None,
        classes: Sequence[str] | None = None,
        mosaic: Any = None,
    ) -> None:
        self.items = list(data.items)
        self.classes = list(classes or data.classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels: list[np.ndarray] = []
        for item in self.items:
            unknown = sorted(set(item.labels) - set(index))
            if unknown:
                raise LeukolabError(
                    f"{item.image}: class {unknown[0]!r} is not one of the model's classes ({', '.join(self.classes)})"
                )
            self.labels.append(np.array([index[c] for c in item.labels], dtype=np.int64))
        self.transform = transform
        self.mosaic = mosaic

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int) -> tuple[tv_tensors.Image, Target]:
        """Item ``i`` untransformed: a ``tv_tensors.Image`` and ``{"boxes": BoundingBoxes, "labels"}``."""
        item = self.items[i]
        arr = np.asarray(load_rgb(item.image))
        h, w = arr.shape[:2]
        if (w, h) != (item.width, item.height):
            raise LeukolabError(f"{item.image} is {w}x{h} but its annotation says {item.width}x{item.height}")
        image = tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(
            torch.as_tensor(item.boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        )
        return image, {"boxes": boxes, "labels": torch.from_numpy(self.labels[i])}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        # p = 0 draws no random number, so a run without mosaic sees the same augmentation stream as before
        if self.mosaic is not None and self.mosaic.p > 0 and float(torch.rand(())) < self.mosaic.p:
            others = [int(j) for j in torch.randint(len(self), (3,))]
            image, target = self.mosaic([self.raw(j) for j in (i, *others)])
            scale: tuple[float, float] = (float("nan"), float("nan"))
        else:
            image, target = self.raw(i)
            h, w = image.shape[-2:]
            if self.transform is not None:
                image, target = self.transform(image, target)
            out_h, out_w = image.shape[-2:]
            scale = (out_w / w, out_h / h)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
            "labels": target["labels"].long(),
            "index": i,
            "scale": scale,
        }


def pad_images(images: Sequence[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
    """Stack ``(C, H, W)`` images into one batch, zero-padded on the right and bottom to a multiple of the stride."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for b, im in enumerate(images):
        batch[b, :, : im.shape[-2], : im.shape[-1]] = im
    return batch


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, Target]], size_divisible: int = 32
) -> tuple[torch.Tensor, list[Target]]:
    """``(images (B, 3, H, W) uint8, targets)``; see :func:`pad_images`."""
    images, targets = zip(*batch, strict=True)
    return pad_images(images, size_divisible), list(targets)
