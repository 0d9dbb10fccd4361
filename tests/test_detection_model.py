"""Detectors: target encoding, a short training that finds the white cells, tiled prediction."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from leukolab.data.detection import DetectionDataset, detection_collate, read_detection
from leukolab.data.detection.transforms import detection_eval_transform
from leukolab.data.synthetic.smears import make_smears
from leukolab.errors import LeukolabError
from leukolab.evaluation.detection import GroundTruth, Prediction, coco_metrics
from leukolab.models.detection import CenterNet, Detector, flip_average
from leukolab.models.detection_infer import TileSpec, check_tiles, predict_field
from leukolab.registry import DETECTORS


def test_registry_builds_random_detectors_offline() -> None:
    assert {"centernet", "ssdlite", "fasterrcnn_mobilenet"} <= set(DETECTORS.names())
    with pytest.raises(LeukolabError, match="unknown detector"):
        DETECTORS.build("yolo_ultra", num_classes=3)
    m = DETECTORS.build("ssdlite", num_classes=2, img_size=128).eval()
    out = m.predict(torch.zeros(1, 3, 96, 128, dtype=torch.uint8))
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_centernet_targets_peak_at_centres_and_decode_back_to_the_boxes() -> None:
    m = CenterNet(2, backbone="resnet10t", channels=16)
    boxes = torch.tensor([[8.0, 12.0, 40.0, 36.0], [60.0, 20.0, 70.0, 28.0]])
    heat, box_t, weight = m.encode([{"boxes": boxes, "labels": torch.tensor([0, 1])}], 16, 24, torch.device("cpu"))
    assert heat.shape == (1, 2, 16, 24) and heat.max() == 1.0
    for (x1, y1, x2, y2), k in zip(boxes.tolist(), (0, 1), strict=True):
        cy, cx = int((y1 + y2) / 2 // 4), int((x1 + x2) / 2 // 4)
        assert heat[0, k, cy, cx] == 1.0
        assert (heat[0, k] == 1.0).sum() == 1
    assert heat[0, 1, 6, 4] == 0.0  # class 0's centre is not a class-1 centre
    # side distances read off the box targets decode back to exactly those boxes
    xs, ys = m._grid(16, 24, torch.device("cpu"))
    x, y = xs[None, :], ys[:, None]
    dist = torch.stack([x - box_t[0, 0], y - box_t[0, 1], box_t[0, 2] - x, box_t[0, 3] - y])[None]
    decoded = m._decode_boxes(dist)[0].permute(1, 2, 0)[weight[0] > 0]
    targets = box_t[0].permute(1, 2, 0)[weight[0] > 0]
    torch.testing.assert_close(decoded, targets)
    assert {tuple(b) for b in targets.tolist()} == {tuple(b) for b in boxes.tolist()}


@pytest.mark.slow
def test_a_short_training_reduces_the_loss_and_finds_the_white_cells(tmp_path) -> None:
    torch.manual_seed(0)
    root = make_smears(tmp_path / "s", 8, width=128, height=96, seed=5, scale=0.3, progress=False)
    data = read_detection(root)
    ds = DetectionDataset(data, detection_eval_transform(128))
    images, targets = detection_collate([ds[i] for i in range(len(ds))])
    m = CenterNet(len(data.classes), backbone="resnet10t", channels=32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    m.train()
    for step in range(40):
        idx = [(2 * step + j) % len(ds) for j in range(4)]
        loss = sum(m.losses(images[idx], [targets[i] for i in idx]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    m.eval()
    wbc = data.classes.index("wbc")
    preds = m.predict(images, score_threshold=0.01)
    gts = [GroundTruth(t["boxes"].numpy(), t["labels"].numpy()) for t in targets]
    res = coco_metrics(gts, [Prediction(p["boxes"].numpy(), p["scores"].numpy(), p["labels"].numpy()) for p in preds],
                       data.classes, score_threshold=0.1)
    assert res.counts["ground_truth"]["wbc"] >= 4
    assert res.recall["wbc"] >= 0.5, res.to_dict()
    assert res.ap50[data.classes[wbc]] > 0.3 and res.ap50["rbc"] > 0.5


class OracleCenterNet(CenterNet):
    """A CenterNet whose 'network' reads the one dark rectangle off the image: a heatmap peak at its centre
    cell and the exact distances from every cell centre to its sides; that is what a perfect net outputs."""

    def __init__(self) -> None:
        super().__init__(1, backbone="resnet10t", channels=8)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        b, _, h, w = images.shape
        heat, dist = torch.full((b, 1, h // 4, w // 4), -12.0), torch.zeros(b, 4, h // 4, w // 4)
        xs, ys = self._grid(h // 4, w // 4, images.device)
        for i, im in enumerate(images):
            dark = torch.nonzero(im.float().mean(0) < 100)
            y1, x1 = dark.min(0).values.tolist()
            y2, x2 = (dark.max(0).values + 1).tolist()
            heat[i, 0, int((y1 + y2) / 2 // 4), int((x1 + x2) / 2 // 4)] = 12.0
            dist[i] = torch.stack(torch.broadcast_tensors(xs[None, :] - x1, ys[:, None] - y1,
                                                          x2 - xs[None, :], y2 - ys[:, None]))
        return heat, dist


def test_flip_tta_decodes_the_same_boxes_and_is_flip_equivariant() -> None:
    image = torch.full((1, 3, 64, 96), 230, dtype=torch.uint8)
    image[:, :, 8:30, 13:41] = 40  # an off-centre cell: a wrong left/right or top/bottom swap moves its box
    oracle = OracleCenterNet().eval()
    plain = oracle.predict(image, score_threshold=0.5)[0]
    tta = oracle.predict(image, score_threshold=0.5, tta=True)[0]
    assert oracle.calls == 1 + 4
    torch.testing.assert_close(plain["boxes"], torch.tensor([[13.0, 8.0, 41.0, 30.0]]))
    torch.testing.assert_close(tta["boxes"], plain["boxes"])
    assert float(tta["scores"][0]) > 0.99
    # on any network, TTA of a flipped field = the TTA of the field, flipped back (sides swapped)
    torch.manual_seed(0)
    net = CenterNet(2, backbone="resnet10t", channels=16).eval()
    x = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        logits, dist = flip_average(net, x)
        h_logits, h_dist = flip_average(net, x.flip(-1))
        v_logits, v_dist = flip_average(net, x.flip(-2))
        one_logits, _ = net(x)
    torch.testing.assert_close(h_logits, logits.flip(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_dist, dist.flip(-1)[:, [2, 1, 0, 3]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_dist, dist.flip(-2)[:, [0, 3, 2, 1]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_logits, logits.flip(-2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(one_logits, logits, atol=1e-3)  # the random net is not flip-invariant itself


def test_flip_tta_is_refused_for_detectors_without_it() -> None:
    m = DETECTORS.build("ssdlite", num_classes=2, img_size=128).eval()
    with pytest.raises(LeukolabError, match="no flip test-time augmentation"):
        predict_field(m, np.zeros((96, 128, 3), np.uint8), 1.0, tta=True)


class BlobDetector(Detector):
    """An exact detector for test images: every connected non-white region is one cell of class 0."""

    stride = 1

    def __init__(self) -> None:
        super().__init__(1, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def predict(self, images: torch.Tensor, score_threshold: float = 0.05, max_detections: int = 100) -> list[Any]:
        out = []
        for im in images:
            self.calls += 1
            lab, n = ndimage.label(im.min(0).values.numpy() < 200)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": b, "scores": torch.full((n,), 0.9), "labels": torch.zeros(n, dtype=torch.long)})
        return out


def test_tiled_prediction_on_a_2x2_mosaic_reports_each_cell_once() -> None:
    rng = np.random.default_rng(0)
    field = np.full((120, 160, 3), 255, np.uint8)
    mosaic = np.concatenate([np.concatenate([field, field], 1)] * 2, 0)  # 240 x 320: four fields
    cells = []
    for _ in range(14):  # random cells, many of them across field and tile borders
        w, h = rng.integers(8, 30, 2)
        x, y = rng.integers(0, 320 - w), rng.integers(0, 240 - h)
        if any(x < c[2] + 3 and c[0] < x + w + 3 and y < c[3] + 3 and c[1] < y + h + 3 for c in cells):
            continue  # keep cells apart so that each is one connected region
        cells.append((x, y, x + w, y + h))
        mosaic[y : y + h, x : x + w] = (120, 60, 160)
    assert len(cells) >= 8
    det = BlobDetector().eval()
    tile = TileSpec(160, 40)
    pred = predict_field(det, mosaic, 1.0, 0.3, tile)
    assert det.calls == len(tile.starts(320)) * len(tile.starts(240)) > 4
    assert len(pred.boxes) == len(cells)
    assert sorted(map(tuple, pred.boxes.astype(int).tolist())) == sorted(cells)
    whole = predict_field(det, mosaic, 1.0, 0.3, None)
    assert len(whole.boxes) == len(cells)
    with pytest.raises(LeukolabError, match="tile size 24 px is not larger than the largest box"):
        check_tiles(TileSpec(24, 10), 30.0)
    with pytest.raises(LeukolabError, match="overlap"):
        check_tiles(TileSpec(160, 10), 30.0)


@pytest.mark.slow
def test_init_loads_a_leukolab_backbone_of_the_same_architecture(tmp_path) -> None:
    import timm

    from leukolab.checkpoints import BackboneSpec, save_checkpoint
    from leukolab.pipelines.detect import build_detector

    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    save_checkpoint({"backbone": source.state_dict(), "backbone_spec": BackboneSpec("resnet10t").to_dict()},
                    tmp_path / "run" / "best.pt")
    cfg = {"data": {"img_size": 128}, "model": {"detector": "centernet", "init": str(tmp_path / "run"),
                                                "detector_kwargs": {"backbone": "resnet10t", "channels": 16}}}
    detector = build_detector(cfg, ["wbc"])
    for k, v in source.state_dict().items():
        torch.testing.assert_close(detector.timm_backbone().state_dict()[k], v)
    # with the default backbone, --init brings its own architecture
    from leukolab.config import load_defaults
    from leukolab.pipelines.detect import _prepare

    fresh = load_defaults("detect")
    fresh["data"]["path"], fresh["model"]["init"] = str(tmp_path), str(tmp_path / "run")
    _prepare(fresh)
    assert fresh["model"]["detector_kwargs"]["backbone"] == "resnet10t"
    cfg["model"]["detector_kwargs"]["backbone"] = "resnet18"
    with pytest.raises(LeukolabError, match="holds a resnet10t backbone"):
        build_detector(cfg, ["wbc"])
    cfg["model"]["detector"] = "ssdlite"
    cfg["model"]["detector_kwargs"] = {}
    with pytest.raises(LeukolabError, match="no timm backbone"):
        build_detector(cfg, ["wbc"])
