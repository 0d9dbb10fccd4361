"""COCO-style detection metrics (pycocotools) and the heatmap focal loss against their reference formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from leukolab.evaluation.detection import GroundTruth, Prediction, coco_metrics, plot_pr_curve, save_comparison
from leukolab.losses.heatmap_focal_loss import heatmap_focal_loss

CLASSES = ["wbc", "rbc", "platelets"]


def _gts(n: int = 12, seed: int = 0) -> list[GroundTruth]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 7))
        xy = rng.uniform(0, 400, (k, 2))
        wh = rng.uniform(20, 120, (k, 2))
        out.append(GroundTruth(np.concatenate([xy, xy + wh], 1), rng.integers(0, 3, k)))
    return out


def _as_pred(gts: list[GroundTruth], shift: float = 0.0, score: float = 0.9) -> list[Prediction]:
    return [Prediction(g.boxes + shift, np.full(len(g.labels), score), g.labels) for g in gts]


def test_ground_truth_as_prediction_scores_one_and_shifts_lower_it() -> None:
    gts = _gts()
    perfect = coco_metrics(gts, _as_pred(gts), CLASSES)
    assert perfect.map50 == pytest.approx(1.0) and perfect.map50_95 == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in perfect.ap50.values())
    assert perfect.precision["all"] == 1.0 and perfect.recall["all"] == 1.0
    maps = [coco_metrics(gts, _as_pred(gts, s), CLASSES) for s in (2.0, 6.0, 12.0, 40.0)]
    assert [m.map50_95 for m in maps] == sorted((m.map50_95 for m in maps), reverse=True)
    assert maps[0].map50_95 < 1.0 and maps[-1].map50 == 0.0
    assert maps[1].map50 > maps[-1].map50


def test_counts_and_threshold_follow_the_matching() -> None:
    gt = [GroundTruth(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))]
    pred = [Prediction(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], float),
                       np.array([0.9, 0.8, 0.2]), np.array([0, 0, 0]))]
    m = coco_metrics(gt, pred, ["wbc", "rbc"], score_threshold=0.5)
    c = m.counts
    assert (c["true_positives"]["wbc"], c["false_positives"]["wbc"], c["false_negatives"]["wbc"]) == (1, 1, 1)
    assert m.precision["wbc"] == 0.5 and m.recall["wbc"] == 0.5
    assert m.ap50["rbc"] is None and m.precision["rbc"] is None  # no ground truth: left out of the means
    # AP ranks all detections: TP (0.9), FP (0.8), TP (0.2) -> precision 1 up to recall .5, then 2/3
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert m.ap50["wbc"] == pytest.approx(expected, abs=1e-6) and m.map50 == pytest.approx(expected, abs=1e-6)
    # per-class thresholds
    m2 = coco_metrics(gt, pred, ["wbc", "rbc"], score_threshold=[0.1, 0.5])
    assert m2.counts["true_positives"]["wbc"] == 2 and m2.recall["wbc"] == 1.0
    assert m2.to_dict()["score_threshold"] == [0.1, 0.5]


def test_no_predictions_and_no_ground_truth() -> None:
    gts = _gts(3)
    empty = [Prediction(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)) for _ in gts]
    m = coco_metrics(gts, empty, CLASSES)
    assert m.map50 == 0.0 and m.recall["all"] == 0.0 and m.precision["all"] is None
    none = [GroundTruth(np.zeros((0, 4)), np.zeros(0, int)) for _ in gts]
    m = coco_metrics(none, _as_pred(gts), CLASSES)
    assert all(v is None for v in m.ap50.values()) and m.counts["false_positives"]["wbc"] > 0


def test_figures(tmp_path: Path) -> None:
    gts = _gts(2)
    m = coco_metrics(gts, _as_pred(gts, 3.0), CLASSES)
    path = plot_pr_curve(m.pr_curves["wbc"], tmp_path / "pr_wbc.png", "wbc", m.ap50["wbc"])
    assert path.stat().st_size > 1000
    image = np.full((520, 520, 3), 230, np.uint8)
    out = save_comparison(image, gts[0], _as_pred(gts)[0], CLASSES, tmp_path / "ex" / "a.png")
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (520 * 2 + 8, 520)
        assert np.asarray(im).min() < 230  # boxes were drawn


def _reference_focal(logits: np.ndarray, target: np.ndarray, alpha: float = 2.0, beta: float = 4.0) -> float:
    total, n_pos = 0.0, 0
    for z, y in zip(logits.ravel(), target.ravel(), strict=True):
        p = 1.0 / (1.0 + math.exp(-z))
        if y == 1.0:
            total += (1 - p) ** alpha * math.log(p)
            n_pos += 1
        else:
            total += (1 - y) ** beta * p**alpha * math.log(1 - p)
    return -total / max(1, n_pos)


def test_heatmap_focal_loss_matches_the_centernet_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g) * 2
    target = torch.rand(2, 3, 5, 6, generator=g) * 0.9
    target[0, 1, 2, 3] = target[1, 0, 4, 5] = target[1, 2, 0, 0] = 1.0
    got = float(heatmap_focal_loss(logits, target))
    assert got == pytest.approx(_reference_focal(logits.numpy(), target.numpy()), rel=1e-5)
    got = float(heatmap_focal_loss(logits, target, alpha=1.5, beta=2.0))
    assert got == pytest.approx(_reference_focal(logits.numpy(), target.numpy(), 1.5, 2.0), rel=1e-5)
    # no centre: the sum is not divided by zero
    zero = torch.zeros_like(target)
    assert float(heatmap_focal_loss(logits, zero)) == pytest.approx(_reference_focal(logits.numpy(), zero.numpy()))
    # saturated logits stay finite, and a perfect heatmap costs ~nothing
    perfect = torch.where(target == 1.0, torch.tensor(30.0), torch.tensor(-30.0))
    assert float(heatmap_focal_loss(perfect, (target == 1.0).float())) < 1e-6
