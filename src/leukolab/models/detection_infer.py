"""Apply a detector to whole fields: resize to the training scale, optionally tile, merge, threshold.

A detector is trained on fields resized so that their longer side is
``img_size``: the network sees cells at ``scale = img_size / field_size``
times their size in the original image. :func:`predict_field` keeps that
scale. Without tiling it resizes the image the same way (right for images of
the training field size). With tiling, an image larger than the training field
is cut into ``field_size`` tiles that overlap by more than the largest cell, so
every cell lies whole in at least one tile; boxes that touch an inner tile
border (cut cells, whole in the neighbour) are dropped, the rest mapped back
to the image and merged across tiles by class-wise NMS, so one cell is
reported once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from leukolab.data.detection.dataset import pad_images
from leukolab.errors import LeukolabError
from leukolab.models.detection import Detector
from leukolab.models.detection_onnx import OnnxDetector

#: what :func:`predict_field` runs: a torch detector or its ONNX Runtime twin
AnyDetector = Detector | OnnxDetector


@dataclass
class FieldPrediction:
    """Boxes (M, 4) in original image pixels, scores (M,) and class indices (M,), best first."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def keep(self, mask: np.ndarray) -> FieldPrediction:
        """The detections where ``mask`` is true."""
        return FieldPrediction(self.boxes[mask], self.scores[mask], self.labels[mask])


@dataclass(frozen=True)
class TileSpec:
    """Tiles of ``size`` original pixels overlapping by ``overlap`` pixels."""

    size: int
    overlap: int

    def starts(self, length: int) -> list[int]:
        """Tile offsets covering ``length`` pixels (the last tile flush with the end)."""
        if length <= self.size:
            return [0]
        step = self.size - self.overlap
        n = math.ceil((length - self.size) / step) + 1
        return sorted({min(i * step, length - self.size) for i in range(n)})


def check_tiles(tile: TileSpec, largest_box: float) -> None:
    """Refuse tiles that cannot hold the largest expected cell whole (and overlaps that do not cover it)."""
    if tile.size <= largest_box:
        raise LeukolabError(
            f"tile size {tile.size} px is not larger than the largest box ({largest_box:.0f} px); "
            "expected a tile larger than every cell"
        )
    if not largest_box <= tile.overlap < tile.size:
        raise LeukolabError(
            f"tile overlap {tile.overlap} px must be at least the largest box ({largest_box:.0f} px) "
            f"and below the tile size ({tile.size} px)"
        )


def _to_tensor(image: np.ndarray, scale: float) -> torch.Tensor:
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    h, w = t.shape[-2:]
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    if size != [h, w]:
        t = F.interpolate(t[None].float(), size=size, mode="bilinear", antialias=scale < 1, align_corners=False)[0]
        t = t.round().clamp(0, 255).to(torch.uint8)
    return t


def check_tta(detector: AnyDetector) -> None:
    """Refuse flip TTA for a detector whose ``predict`` cannot average flips (the torchvision ones)."""
    if not getattr(detector, "supports_tta", False):
        name = type(detector).__name__
        raise LeukolabError(f"--tta: {name} has no flip test-time augmentation; expected a centernet run")


@torch.no_grad()
def _run(
    detector: AnyDetector, tiles: Sequence[torch.Tensor], score: float, max_det: int, tta: bool = False
) -> list[dict[str, Any]]:
    device = next(detector.parameters()).device if isinstance(detector, torch.nn.Module) else torch.device("cpu")
    batch = pad_images(tiles, detector.stride).to(device)
    if tta:
        return detector.predict(batch, score_threshold=score, max_detections=max_det, tta=True)
    return detector.predict(batch, score_threshold=score, max_detections=max_det)


def predict_field(
    detector: AnyDetector,
    image: np.ndarray,
    scale: float,
    score_threshold: float | Sequence[float] = 0.3,
    tile: TileSpec | None = None,
    nms_iou: float = 0.5,
    max_detections: int = 300,
    batch_size: int = 4,
    tta: bool = False,
) -> FieldPrediction:
    """Detections of one RGB uint8 ``image`` (H, W, 3) in its own pixels.

    Args:
        detector: a trained detector in eval mode, or an :class:`~leukolab.models.detection_onnx.OnnxDetector`.
        image: the field.
        scale: network pixels per image pixel (``img_size / field_size`` of the training data).
        score_threshold: keep detections scoring at least this (one value or one per class).
        tile: tile the image (sizes in image pixels); ``None`` runs the whole image at once.
        nms_iou: class-wise NMS over the merged tiles.
        max_detections: per tile, and for the image.
        batch_size: tiles per forward pass.
        tta: average the heatmaps and box sides of the four flips of each tile (centernet; 4x the cost).
    """
    if tta:
        check_tta(detector)
    k = detector.num_classes
    thr = np.broadcast_to(np.asarray(score_threshold, dtype=np.float64), (k,))
    low = float(thr.min())
    h, w = image.shape[:2]
    if tile is None:
        origins = [(0, 0, w, h)]
    else:
        origins = [(x, y, min(w, x + tile.size), min(h, y + tile.size))
                   for y in tile.starts(h) for x in tile.starts(w)]
    boxes, scores, labels = [], [], []
    for i in range(0, len(origins), batch_size):
        chunk = origins[i : i + batch_size]
        tensors = [_to_tensor(image[y0:y1, x0:x1], scale) for x0, y0, x1, y1 in chunk]
        dets = _run(detector, tensors, low, max_detections, tta)
        for (x0, y0, x1, y1), t, det in zip(chunk, tensors, dets, strict=True):
            b = det["boxes"].float().cpu().numpy().reshape(-1, 4)
            sy, sx = t.shape[-2] / (y1 - y0), t.shape[-1] / (x1 - x0)
            b = b / np.array([sx, sy, sx, sy]) + np.array([x0, y0, x0, y0])
            b[:, 0::2] = b[:, 0::2].clip(x0, x1)
            b[:, 1::2] = b[:, 1::2].clip(y0, y1)
            if tile is not None:  # a box touching an inner tile border is a cut cell, whole in the neighbour tile
                m = 2.0 / scale
                cut = ((b[:, 0] <= x0 + m) & (x0 > 0)) | ((b[:, 1] <= y0 + m) & (y0 > 0)) | (
                    (b[:, 2] >= x1 - m) & (x1 < w)) | ((b[:, 3] >= y1 - m) & (y1 < h))
                keep = ~cut
            else:
                keep = np.ones(len(b), dtype=bool)
            boxes.append(b[keep])
            scores.append(det["scores"].float().cpu().numpy()[keep])
            labels.append(det["labels"].cpu().numpy()[keep])
    pred = FieldPrediction(np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores), np.concatenate(labels))
    pred = pred.keep(pred.scores >= thr[pred.labels] if len(pred.labels) else np.zeros(0, dtype=bool))
    if tile is not None and len(pred.scores) and len(origins) > 1:
        kept = batched_nms(torch.from_numpy(pred.boxes).float(), torch.from_numpy(pred.scores).float(),
                           torch.from_numpy(pred.labels).long(), nms_iou).numpy()
        pred = FieldPrediction(pred.boxes[kept], pred.scores[kept], pred.labels[kept])
    order = np.argsort(-pred.scores, kind="stable")[:max_detections]
    return FieldPrediction(pred.boxes[order], pred.scores[order], pred.labels[order].astype(np.int64))
