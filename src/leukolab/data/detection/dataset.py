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
    """``(uint8 image tensor, target)`` pairs of a :class:`DetectionData`, in ``classes`` order."""

    def __init__(
        self,
        data: DetectionData,
        transform: Callable[..., Any] | None = None,
        classes: Sequence[str] | None = None,
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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        item = self.items[i]
        arr = np.asarray(load_rgb(item.image))
        h, w = arr.shape[:2]
        if (w, h) != (item.width, item.height):
            raise LeukolabError(f"{item.image} is {w}x{h} but its annotation says {item.width}x{item.height}")
        image = tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(
            torch.as_tensor(item.boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        )
        target: Target = {"boxes": boxes, "labels": torch.from_numpy(self.labels[i])}
        if self.transform is not None:
            image, target = self.transform(image, target)
        out_h, out_w = image.shape[-2:]
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
            "labels": target["labels"].long(),
            "index": i,
            "scale": (out_w / w, out_h / h),
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
