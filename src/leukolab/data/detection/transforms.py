"""Box-aware transforms for smear fields, built from :mod:`torchvision.transforms.v2`.

torchvision's v2 transforms move ``BoundingBoxes`` with the image, so flips,
rotations, rescaling and crops need no hand-written box arithmetic. Added here:
:class:`RandomRot90` (a smear has no up or down) and :class:`ResizeLongSide`
(fit the longer side to the model's size, aspect kept).

Training: scale jitter -> random crop of ``size x size`` -> flips -> 90 degree
rotations -> brightness / contrast / saturation and per-channel stain jitter -> drop boxes
that left the crop.
Evaluation and prediction: resize the longer side to ``size`` (no crop); the
collate function pads to a multiple of the network stride.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomRot90(v2.Transform):
    """Rotate image and boxes by 0, 90, 180 or 270 degrees, chosen uniformly."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"angle": 90 * int(torch.randint(4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["angle"] == 0 or not isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes, torch.Tensor)):
            return inpt
        return F.rotate(inpt, params["angle"], expand=True)


class ResizeLongSide(v2.Transform):
    """Resize so that the longer side is ``size`` pixels (aspect kept; antialiased when shrinking)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = self.size / max(h, w)
        return {"hw": (max(1, round(h * s)), max(1, round(w * s)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes, torch.Tensor)):
            return inpt
        return F.resize(inpt, list(params["hw"]), antialias=True)


class RandomStain(v2.Transform):
    """Scale each colour channel by its own random factor ``exp(N(0, sigma))`` (stain-strength variation).

    Much cheaper than ``ColorJitter(hue=...)``, whose RGB -> HSV round trip costs more than
    the rest of the augmentation together on a CPU.
    """

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gain": torch.exp(torch.randn(3) * self.sigma)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        out = (inpt.float() * params["gain"].view(3, 1, 1)).round_().clamp_(0, 255).to(inpt.dtype)
        return tv_tensors.wrap(out, like=inpt)


def detection_train_transform(
    size: int,
    scale: tuple[float, float] = (0.75, 1.25),
    flips: bool = True,
    rot90: bool = True,
    color: float = 0.2,
    hue: float = 0.0,
    stain: float = 0.05,
) -> v2.Compose:
    """Augmentations for training at ``size x size`` crops of a field rescaled to ``size * U(scale)``."""
    steps: list[v2.Transform] = [
        v2.RandomChoice([ResizeLongSide(round(size * s)) for s in _scales(scale)]),
        v2.RandomCrop(size, pad_if_needed=True, fill=0),
    ]
    if flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(RandomRot90())
    if color > 0 or hue > 0:
        steps.append(v2.ColorJitter(brightness=color, contrast=color, saturation=color, hue=hue))
    if stain > 0:
        steps.append(RandomStain(stain))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)]
    return v2.Compose(steps)


def _scales(scale: tuple[float, float], n: int = 9) -> list[float]:
    lo, hi = scale
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)] if hi > lo else [lo]


def detection_eval_transform(size: int) -> v2.Compose:
    """Resize the longer side to ``size`` (boxes follow)."""
    return v2.Compose([ResizeLongSide(size)])
