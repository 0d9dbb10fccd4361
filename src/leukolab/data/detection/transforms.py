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

:class:`Mosaic` (``augment.mosaic`` = its probability, 0.5 by default) builds a
``size x size`` sample from four fields instead of one: each field is scale
jittered as above, a random crop of it fills one quadrant around a random
centre, boxes move with it, are clipped, and leftovers showing under
``min_visible`` of their area (or under 2 px) are dropped; the canvas then goes
through the same flips / rotations / colour steps as a single field.
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
    return v2.Compose(steps + detection_train_post(flips, rot90, color, hue, stain))


def detection_train_post(
    flips: bool = True, rot90: bool = True, color: float = 0.2, hue: float = 0.0, stain: float = 0.05
) -> list[v2.Transform]:
    """The training steps after scaling and cropping (shared by single fields and mosaics): flips, 90 degree
    rotations, colour and stain jitter, then clamping boxes to the image and dropping those under 2 px."""
    steps: list[v2.Transform] = []
    if flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(RandomRot90())
    if color > 0 or hue > 0:
        steps.append(v2.ColorJitter(brightness=color, contrast=color, saturation=color, hue=hue))
    if stain > 0:
        steps.append(RandomStain(stain))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)]
    return steps


def _scales(scale: tuple[float, float], n: int = 9) -> list[float]:
    lo, hi = scale
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)] if hi > lo else [lo]


def detection_eval_transform(size: int) -> v2.Compose:
    """Resize the longer side to ``size`` (boxes follow)."""
    return v2.Compose([ResizeLongSide(size)])


def visible_boxes(
    boxes: torch.Tensor, width: int, height: int, min_visible: float = 0.25, min_size: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``boxes`` (N, 4, x1 y1 x2 y2) to a ``width x height`` window at the origin.

    Returns the clipped boxes and a keep mask: at least ``min_visible`` of the box's area and
    ``min_size`` px in both directions left inside the window.
    """
    boxes = boxes.float().reshape(-1, 4)
    clipped = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    keep = (cw >= min_size) & (ch >= min_size) & (cw * ch >= min_visible * area)
    return clipped, keep


class Mosaic:
    """Four fields in one ``size x size`` canvas (YOLOv4's mosaic at the training scale), then ``post``.

    Called with four ``(image, target)`` samples as :class:`~leukolab.data.detection.DetectionDataset`
    reads them (a ``tv_tensors.Image`` and a dict with ``boxes`` (``BoundingBoxes``) and ``labels``);
    returns one sample of the same form. Cells keep the training scale: each field is resized to a
    longer side of ``size * U(scale)`` exactly as a single training field is, and a random crop of it
    fills one quadrant around a centre drawn in the middle half of the canvas (the crop touches the
    centre; a field too small for its quadrant leaves the outer rest black, like ``RandomCrop``'s padding).
    Randomness comes from torch's generator, as in every other step.
    """

    def __init__(
        self,
        size: int,
        p: float,
        scale: tuple[float, float] = (0.75, 1.25),
        post: Any = None,
        min_visible: float = 0.25,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mosaic probability {p} is outside [0, 1]")
        self.size, self.p, self.min_visible = int(size), float(p), float(min_visible)
        self.resizes = [ResizeLongSide(round(size * s)) for s in _scales(scale)]
        self.post = post

    def __call__(self, samples: list[tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
        if len(samples) != 4:
            raise ValueError(f"a mosaic needs 4 samples, got {len(samples)}")
        s = self.size
        cx, cy = (int(v) for v in torch.randint(s // 4, s - s // 4 + 1, (2,)))
        first = samples[0][0]
        canvas = torch.zeros((first.shape[0], s, s), dtype=first.dtype)
        all_boxes, all_labels = [], []
        quadrants = [(0, 0, cx, cy), (cx, 0, s, cy), (0, cy, cx, s), (cx, cy, s, s)]
        for k, ((image, target), (x0, y0, x1, y1)) in enumerate(zip(samples, quadrants, strict=True)):
            resize = self.resizes[int(torch.randint(len(self.resizes), ()))]
            image, boxes = resize(image, target["boxes"])
            h, w = image.shape[-2:]
            cw, ch = min(x1 - x0, w), min(y1 - y0, h)
            if cw <= 0 or ch <= 0:
                continue
            ox = int(torch.randint(w - cw + 1, ()))
            oy = int(torch.randint(h - ch + 1, ()))
            px = x1 - cw if k in (0, 2) else x0  # left quadrants end at the centre, right ones start there
            py = y1 - ch if k in (0, 1) else y0
            canvas[:, py : py + ch, px : px + cw] = image[:, oy : oy + ch, ox : ox + cw]
            shifted = boxes.as_subclass(torch.Tensor).float().reshape(-1, 4) - torch.tensor([ox, oy, ox, oy])
            clipped, keep = visible_boxes(shifted, cw, ch, self.min_visible)
            all_boxes.append(clipped[keep] + torch.tensor([px, py, px, py], dtype=torch.float32))
            all_labels.append(torch.as_tensor(target["labels"])[keep])
        out_image = tv_tensors.Image(canvas)
        out_target = {
            "boxes": tv_tensors.BoundingBoxes(torch.cat(all_boxes).reshape(-1, 4), format="XYXY", canvas_size=(s, s)),
            "labels": torch.cat(all_labels).long(),
        }
        if self.post is not None:
            out_image, out_target = self.post(out_image, out_target)
        return out_image, out_target
