"""Object detectors for smear fields, built by name from :data:`leukolab.registry.DETECTORS`.

Every detector takes uint8 ``(B, 3, H, W)`` batches (normalising them itself)
and offers the same three calls, so the objective, evaluation and prediction
never ask which one they hold:

* ``losses(images, targets) -> {name: loss}`` (training mode; targets are dicts
  with ``boxes`` ``x1, y1, x2, y2`` in input pixels and ``labels`` 0..K-1);
* ``predict(images, score_threshold, max_detections) -> [{boxes, scores, labels}]``
  in input pixels, after NMS;
* ``stride``: the collate function pads images to a multiple of it.

Detectors:

* ``centernet`` - a heatmap detector on any timm backbone (random weights, or
  a leukolab backbone through ``--init``): features at strides 4-32 are
  projected, upsampled to stride 4 and summed; a class heatmap marks centres
  (CenterNet's focal loss on elliptical Gaussians) and a box head regresses the
  distances to the four sides with TTFNet's Gaussian-weighted GIoU loss, which
  trains in far fewer epochs than CenterNet's size/offset L1 losses. The
  backbone keeps timm's names, so checkpoints carry it like every leukolab run.
* ``ssdlite`` - torchvision's SSDlite with a MobileNetV3-Large (BSD), random weights.
* ``fasterrcnn_mobilenet`` - torchvision's Faster R-CNN with a MobileNetV3-Large FPN, random weights.

Nothing is downloaded: every factory builds random weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss

from leukolab.checkpoints import LEUKOLAB_MEAN, LEUKOLAB_STD
from leukolab.errors import LeukolabError
from leukolab.losses.heatmap_focal_loss import heatmap_focal_loss
from leukolab.registry import DETECTORS

Target = dict[str, Any]


class Detector(nn.Module):
    """The interface every registered detector implements (see the module docstring)."""

    stride: int = 32
    #: timm name of :meth:`timm_backbone` (None when the detector has no timm backbone)
    backbone_name: str | None = None
    #: whether :meth:`predict` takes ``tta=True`` (flip test-time augmentation)
    supports_tta: bool = False

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if num_classes < 1:
            raise LeukolabError(f"a detector needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def timm_backbone(self) -> nn.Module | None:
        """The timm backbone (for ``--init`` and the ``backbone`` checkpoint entry), or None."""
        return None

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) images -> normalised float."""
        return (images.float() - self.mean) / self.std

    def losses(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(
        self, images: torch.Tensor, score_threshold: float = 0.05, max_detections: int = 100
    ) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# CenterNet-style heatmap detector on a timm backbone
# ----------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _head(channels: int, out: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, out, 1)
    )
    nn.init.constant_(head[-1].bias, bias)
    nn.init.normal_(head[-1].weight, std=0.01)
    return head


#: the flips :func:`flip_average` runs: (horizontal, vertical); a smear field has no up or left
FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def flip_average(
    net: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip test-time augmentation of a heatmap detector's raw outputs (CenterNet's flip test, both axes).

    Runs ``net`` (images -> heatmap logits (B, K, h, w), side distances (B, 4, h, w) as left, top,
    right, bottom) on the four :data:`FLIPS` of ``images``, flips the outputs back (a horizontal flip
    also swaps the left and right distances, a vertical one top and bottom) and averages heatmap
    probabilities and distances. Returns logits of the mean probability and the mean distances, so the
    result decodes like one forward pass. ``images`` must be padded to a multiple of the output stride.
    """
    probs, dists = [], []
    for hflip, vflip in FLIPS:
        dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
        logits, dist = net(images.flip(dims) if dims else images)
        logits, dist = logits.float(), dist.float()
        if dims:
            logits, dist = logits.flip(dims), dist.flip(dims)
        if hflip:
            dist = dist[:, [2, 1, 0, 3]]
        if vflip:
            dist = dist[:, [0, 3, 2, 1]]
        probs.append(logits.sigmoid())
        dists.append(dist)
    prob = torch.stack(probs).mean(0).clamp(1e-6, 1 - 1e-6)
    return torch.logit(prob), torch.stack(dists).mean(0)


def gaussian_2d(
    cx: torch.Tensor, cy: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor
) -> torch.Tensor:
    """Elliptical Gaussians (one per centre) on the grid ``xs`` (W,) x ``ys`` (H,): (N, H, W), peak 1."""
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * sx[:, None] ** 2))
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * sy[:, None] ** 2))
    return gy[:, :, None] * gx[:, None, :]


class CenterNet(Detector):
    """Heatmap + side-distance detector at stride 4 on a timm backbone (see the module docstring)."""

    stride = 32
    supports_tta = True

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        channels: int = 96,
        out_stride: int = 4,
        alpha: float = 0.54,
        beta: float = 0.54,
        box_weight: float = 5.0,
        mean: Sequence[float] = LEUKOLAB_MEAN,
        std: Sequence[float] = LEUKOLAB_STD,
    ) -> None:
        import timm

        super().__init__(num_classes, mean, std)
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **self.backbone_kwargs}
        try:
            model = timm.create_model(backbone, **kwargs)
        except RuntimeError as exc:  # unknown model name
            raise LeukolabError(f"unknown backbone {backbone!r} ({exc}); expected a timm model name") from None
        if hasattr(model, "patch_embed"):  # ViTs: any input size, features at the patch stride
            model = timm.create_model(backbone, dynamic_img_size=True, **kwargs)
        if not hasattr(model, "forward_intermediates"):
            raise LeukolabError(
                f"backbone {backbone!r} cannot return intermediate features; expected a timm CNN or ViT"
            )
        self.backbone = model
        info = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.get_dicts()
        reductions = [int(f["reduction"]) for f in info]
        chans = [int(f["num_chs"]) for f in info]
        if len(set(reductions)) == 1:  # plain ViT: the last block's tokens
            self.levels = [len(info) - 1]
        else:
            self.levels = [i for i, r in enumerate(reductions) if r >= out_stride][-4:]
        self.out_stride = int(out_stride)
        self.stride = max(32, max(reductions[i] for i in self.levels))
        self.lateral = nn.ModuleList([_conv_bn(chans[i], channels, 1) for i in self.levels])
        self.fuse = _conv_bn(channels, channels, 3)
        self.heatmap = _head(channels, num_classes, bias=-math.log((1 - 0.01) / 0.01))
        self.box = _head(channels, 4, bias=math.log(2.0))  # exp(log 2) * 16 = 32 px to each side at the start
        self.alpha, self.beta, self.box_weight = float(alpha), float(beta), float(box_weight)
        # side distances are exp(output) * 16 px: FCOS's exp keeps them positive and makes a change of box
        # size by some factor equally easy for platelets and white cells (TTFNet's relu * 16 can die, and
        # softplus learned the large white cells far more slowly: measured in the README's design notes)
        self.box_scale = 16.0

    def timm_backbone(self) -> nn.Module:
        return self.backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(heatmap logits (B, K, H/4, W/4), side distances in px (B, 4, H/4, W/4))`` of uint8 images."""
        x = self.normalise(images)
        feats = self.backbone.forward_intermediates(x, indices=self.levels, intermediates_only=True)
        size = (x.shape[-2] // self.out_stride, x.shape[-1] // self.out_stride)
        fused = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else lat(f)
            for lat, f in zip(self.lateral, feats, strict=True)
        )
        fused = self.fuse(fused)
        return self.heatmap(fused), torch.exp(self.box(fused).float().clamp(max=6.0)) * self.box_scale

    def _grid(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.out_stride
        return (torch.arange(w, device=device) + 0.5) * s, (torch.arange(h, device=device) + 0.5) * s

    def encode(self, targets: list[Target], h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Heatmap targets (B, K, h, w), box targets (B, 4, h, w) and regression weights (B, h, w)."""
        b = len(targets)
        heat = torch.zeros(b, self.num_classes, h, w, device=device)
        box_t = torch.zeros(b, 4, h, w, device=device)
        weight = torch.zeros(b, h, w, device=device)
        xs, ys = self._grid(h, w, device)
        for i, t in enumerate(targets):
            boxes, labels = t["boxes"].to(device).float(), t["labels"].to(device)
            if not len(boxes):
                continue
            bw, bh = (boxes[:, 2] - boxes[:, 0]).clamp(min=1), (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            # centre peak exactly 1 at the cell holding the centre
            pcx = (torch.div(cx, self.out_stride, rounding_mode="floor").clamp(0, w - 1) + 0.5) * self.out_stride
            pcy = (torch.div(cy, self.out_stride, rounding_mode="floor").clamp(0, h - 1) + 0.5) * self.out_stride
            g = gaussian_2d(pcx, pcy, self.alpha * bw / 6, self.alpha * bh / 6, xs, ys)
            for k in labels.unique():
                sel = labels == k
                heat[i, k] = torch.maximum(heat[i, k], g[sel].amax(0))
            # regression: Gaussian-weighted region around each centre, larger boxes first so small ones win
            gr = gaussian_2d(cx, cy, self.beta * bw / 6, self.beta * bh / 6, xs, ys)
            inside = (
                (xs[None, None, :] > boxes[:, 0, None, None]) & (xs[None, None, :] < boxes[:, 2, None, None])
                & (ys[None, :, None] > boxes[:, 1, None, None]) & (ys[None, :, None] < boxes[:, 3, None, None])
            )
            gr = torch.where(inside & (gr > 0.05), gr, torch.zeros_like(gr))
            norm = gr.sum((1, 2)).clamp(min=1e-6)
            area_w = torch.log((bw * bh).clamp(min=2.0))
            for j in torch.argsort(bw * bh, descending=True).tolist():
                region = gr[j] > 0
                if not region.any():  # a box smaller than a cell: its centre cell alone
                    region = torch.zeros_like(region)
                    region[int(pcy[j] // self.out_stride), int(pcx[j] // self.out_stride)] = True
                    wj = area_w[j]
                else:
                    wj = gr[j][region] / norm[j] * area_w[j]
                box_t[i][:, region] = boxes[j][:, None]
                weight[i][region] = wj
        return heat, box_t, weight

    def _decode_boxes(self, dist: torch.Tensor) -> torch.Tensor:
        """Side distances (B, 4, h, w) -> boxes (B, 4, h, w) in input pixels."""
        xs, ys = self._grid(dist.shape[-2], dist.shape[-1], dist.device)
        x, y = xs[None, None, :], ys[None, :, None]
        return torch.cat([x - dist[:, 0:1], y - dist[:, 1:2], x + dist[:, 2:3], y + dist[:, 3:4]], dim=1)

    def losses(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        logits, dist = self(images)
        h, w = logits.shape[-2:]
        heat, box_t, weight = self.encode(targets, h, w, logits.device)
        loss_heat = heatmap_focal_loss(logits, heat)
        pos = weight > 0
        if pos.any():
            pred = self._decode_boxes(dist.float()).permute(0, 2, 3, 1)[pos]
            gt = box_t.permute(0, 2, 3, 1)[pos]
            giou = generalized_box_iou_loss(pred, gt, reduction="none")
            loss_box = (giou * weight[pos]).sum() / weight[pos].sum().clamp(min=1e-6)
        else:
            loss_box = dist.sum() * 0.0
        return {"heatmap": loss_heat, "box": self.box_weight * loss_box}

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, score_threshold: float = 0.05, max_detections: int = 100, nms_iou: float = 0.6,
        tta: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections of a batch of uint8 images; ``tta``: average the four flips (:func:`flip_average`)."""
        logits, dist = flip_average(self, images) if tta else self(images)
        return self.decode(logits, dist, images.shape[-2:], score_threshold, max_detections, nms_iou)

    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, dist: torch.Tensor, image_hw: Sequence[int], score_threshold: float = 0.05,
        max_detections: int = 100, nms_iou: float = 0.6,
    ) -> list[dict[str, torch.Tensor]]:
        """Boxes of :meth:`forward`'s outputs (from torch or an exported ONNX model): peaks, boxes, class-wise NMS.

        ``image_hw`` is the (padded) input's height and width; boxes are clipped to it.
        """
        images_h, images_w = int(image_hw[0]), int(image_hw[1])
        scores = logits.float().sigmoid()
        peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)  # CenterNet's 3x3 peak picking
        boxes = self._decode_boxes(dist.float())
        b, k, h, w = scores.shape
        out = []
        for i in range(b):
            top, idx = peaks[i].reshape(-1).topk(min(max_detections * 2, k * h * w))
            keep = top >= score_threshold
            top, idx = top[keep], idx[keep]
            labels, pix = idx // (h * w), idx % (h * w)
            bx = boxes[i].reshape(4, -1)[:, pix].T
            bx[:, 0::2] = bx[:, 0::2].clamp(0, images_w)
            bx[:, 1::2] = bx[:, 1::2].clamp(0, images_h)
            kept = batched_nms(bx, top, labels, nms_iou)[:max_detections]
            out.append({"boxes": bx[kept], "scores": top[kept], "labels": labels[kept]})
        return out


@DETECTORS.register("centernet")
def centernet(num_classes: int, backbone: str = "resnet18", img_size: int | None = None, **kwargs: Any) -> CenterNet:
    """CenterNet-style heatmap detector on a timm backbone (random weights; fully convolutional, any ``img_size``)."""
    return CenterNet(num_classes, backbone=backbone, **kwargs)


# ----------------------------------------------------------------------------------------------
# torchvision detectors
# ----------------------------------------------------------------------------------------------


class TorchvisionDetector(Detector):
    """A torchvision detection model behind the :class:`Detector` interface (labels shifted by one: 0 = background)."""

    def __init__(self, model: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(num_classes, mean, std)
        self.model = model

    def _inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(images.float() / 255.0)

    def forward(self, images: torch.Tensor) -> Any:
        return self.model(self._inputs(images))

    def losses(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        tv_targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long() + 1} for t in targets]
        return dict(self.model(self._inputs(images), tv_targets))

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, score_threshold: float = 0.05, max_detections: int = 100
    ) -> list[dict[str, torch.Tensor]]:
        out = []
        for det in self.model(self._inputs(images)):
            keep = det["scores"] >= score_threshold
            out.append({"boxes": det["boxes"][keep][:max_detections], "scores": det["scores"][keep][:max_detections],
                        "labels": det["labels"][keep][:max_detections] - 1})
        return out


@DETECTORS.register("ssdlite")
def ssdlite(
    num_classes: int,
    img_size: int = 320,
    mean: Sequence[float] = LEUKOLAB_MEAN,
    std: Sequence[float] = LEUKOLAB_STD,
    **kwargs: Any,
) -> TorchvisionDetector:
    """torchvision SSDlite320-MobileNetV3-Large, random weights, inputs resized to ``img_size`` squared."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
    model.transform = GeneralizedRCNNTransform(
        img_size, img_size, list(mean), list(std), size_divisible=1, fixed_size=(img_size, img_size)
    )
    return TorchvisionDetector(model, num_classes, mean, std)


@DETECTORS.register("fasterrcnn_mobilenet")
def fasterrcnn_mobilenet(
    num_classes: int,
    img_size: int = 640,
    mean: Sequence[float] = LEUKOLAB_MEAN,
    std: Sequence[float] = LEUKOLAB_STD,
    **kwargs: Any,
) -> TorchvisionDetector:
    """torchvision Faster R-CNN MobileNetV3-Large FPN, random weights, longer side resized to ``img_size``."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=img_size * 3 // 4,
        max_size=img_size, image_mean=list(mean), image_std=list(std), **kwargs,
    )
    return TorchvisionDetector(model, num_classes, mean, std)
