"""Mosaic augmentation for detection: boxes land on their cells' pixels; off by default; bad values refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from leukolab.config import load_defaults
from leukolab.data.detection import DetectionDataset, read_detection
from leukolab.data.detection.transforms import (
    Mosaic,
    detection_train_post,
    detection_train_transform,
    visible_boxes,
)
from leukolab.data.synthetic.smears import make_smears
from leukolab.errors import LeukolabError

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)  # one per class


def _field(rng: np.random.Generator, w: int = 120, h: int = 90) -> tuple[tv_tensors.Image, dict]:
    """A black field with solid rectangles in their class colour, at non-overlapping random spots."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes, labels = [], []
    for gx in range(0, w - 30, 30):
        for gy in range(0, h - 30, 30):
            if rng.random() < 0.3:
                continue
            bw, bh = rng.integers(10, 28, 2)
            x1, y1 = gx + int(rng.integers(0, 30 - bw + 1)), gy + int(rng.integers(0, 30 - bh + 1))
            k = int(rng.integers(3))
            image[:, y1 : y1 + bh, x1 : x1 + bw] = COLOURS[k][:, None, None]
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(k)
    return tv_tensors.Image(image), {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mosaic_boxes_land_on_their_rectangles(seed: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = 128
    post = v2.Compose(detection_train_post(flips=True, rot90=True, color=0.0, hue=0.0, stain=0.0))
    mosaic = Mosaic(size, 1.0, scale=(0.75, 1.25), post=post, min_visible=0.0)
    image, target = mosaic([_field(rng) for _ in range(4)])
    assert image.shape == (3, size, size) and image.dtype == torch.uint8
    boxes, labels = target["boxes"].as_subclass(torch.Tensor), target["labels"]
    assert len(boxes) >= 4 and len(boxes) == len(labels)
    img = image.as_subclass(torch.Tensor).int()
    covered = torch.zeros(size, size, dtype=torch.bool)
    for (x1, y1, x2, y2), k in zip(boxes.round().int().tolist(), labels.tolist(), strict=True):
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        covered[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2] = True
        inner = img[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]  # resizing blurs the outermost pixel
        if inner.numel():
            # the box's inside is its own class's colour (no other class, no background)
            assert (inner - COLOURS[k].int()[:, None, None]).abs().amax() <= 60, (k, (x1, y1, x2, y2))
    # and every coloured pixel lies in some box (slivers of cut cells below 2 px are dropped: at most a few)
    coloured = img.amax(0) > 127
    assert (coloured & ~covered).sum() <= 0.01 * coloured.sum()


def test_visible_boxes_drops_tiny_leftovers() -> None:
    boxes = torch.tensor([[10.0, 10, 30, 30], [-15, 0, 5, 20], [-19, 0, 1, 20], [50, 50, 70, 70]])
    clipped, keep = visible_boxes(boxes, 60, 60, min_visible=0.25)
    torch.testing.assert_close(clipped[0], boxes[0])
    torch.testing.assert_close(clipped[1], torch.tensor([0.0, 0, 5, 20]))
    # whole / 25 % visible / 1 px sliver / 10 x 10 = 25 % of the area in the corner
    assert keep.tolist() == [True, True, False, True]
    assert visible_boxes(boxes, 60, 60, min_visible=0.3)[1].tolist() == [True, False, False, False]


def test_mosaic_default_and_p0_changes_nothing(tmp_path: Path) -> None:
    assert load_defaults("detect")["augment"]["mosaic"] == 0.5  # the measured default (README, BCCD table)
    data = read_detection(make_smears(tmp_path / "s", 4, width=96, height=64, seed=1, scale=0.3, progress=False))
    tf = detection_train_transform(64)
    plain = DetectionDataset(data, tf)
    off = DetectionDataset(data, tf, mosaic=Mosaic(64, 0.0, post=v2.Compose(detection_train_post())))
    on = DetectionDataset(data, tf, mosaic=Mosaic(64, 1.0, post=v2.Compose(detection_train_post())))
    for i in range(len(data)):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = off[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        image, target = on[i]
        assert image.shape[-2:] == (64, 64) and np.isnan(target["scale"][0])
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 64)).all()


def test_mosaic_option_is_checked(tmp_path: Path) -> None:
    from leukolab.pipelines.detect import train_detector

    root = make_smears(tmp_path / "s", 4, width=96, height=64, seed=1, scale=0.3, progress=False)
    with pytest.raises(LeukolabError, match=r"--mosaic 1.5: expected a probability"):
        train_detector(tmp_path / "runs", overrides={"data.path": str(root), "augment.mosaic": 1.5})
    with pytest.raises(ValueError, match="outside"):
        Mosaic(64, -0.1)
