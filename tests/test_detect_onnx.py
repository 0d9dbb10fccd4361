"""ONNX Runtime backend of the centernet detector: same raw outputs and boxes as torch; CLI; missing extra."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from leukolab.cli.main import main
from leukolab.data.synthetic.smears import make_smears
from leukolab.models.detection import CenterNet
from leukolab.models.detection_infer import predict_field

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnxruntime / onnx not installed (pip install 'leukolab[onnx]')")


def _run(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _detector() -> CenterNet:
    """The default backbone with a random heatmap head spread wide enough to give many distinct peaks."""
    torch.manual_seed(0)
    m = CenterNet(3, backbone="mobilenetv4_conv_small", channels=16)
    torch.nn.init.normal_(m.heatmap[-1].weight, std=0.5)
    torch.nn.init.constant_(m.heatmap[-1].bias, -1.0)
    torch.nn.init.normal_(m.box[-1].weight, std=0.05)
    return m.eval()


def _same_boxes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same detections up to float rounding (order of near-equal scores may differ)."""
    assert len(a["scores"]) == len(b["scores"]) > 0

    def rows(d: dict[str, torch.Tensor]) -> np.ndarray:
        r = np.column_stack([d["labels"].numpy(), d["boxes"].numpy(), d["scores"].numpy()])
        return r[np.lexsort(r[:, ::-1].T)]

    ra, rb = rows(a), rows(b)
    np.testing.assert_array_equal(ra[:, 0], rb[:, 0])
    np.testing.assert_allclose(ra[:, 1:5], rb[:, 1:5], atol=1e-2)
    np.testing.assert_allclose(ra[:, 5], rb[:, 5], atol=1e-4)


@needs_onnx
def test_onnx_export_gives_torch_outputs_and_boxes_at_any_size() -> None:
    from leukolab.models.detection_onnx import OnnxDetector

    torch.set_num_threads(1)
    m = _detector()
    onnx_det = OnnxDetector(m, threads=1)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 96, 128), (2, 3, 128, 160)]:  # dynamic batch, height and width
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            heat_t, dist_t = m(images)
        heat_o, dist_o = onnx_det(images)
        assert heat_o.shape == heat_t.shape and dist_o.shape == dist_t.shape
        torch.testing.assert_close(heat_o, heat_t, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dist_o, dist_t, atol=1e-3, rtol=1e-4)
        for a, b in zip(m.predict(images, 0.2), onnx_det.predict(images, 0.2), strict=True):
            _same_boxes(a, b)
        for a, b in zip(m.predict(images, 0.2, tta=True), onnx_det.predict(images, 0.2, tta=True), strict=True):
            _same_boxes(a, b)  # flip TTA runs the same four flips through ONNX Runtime
    # the whole field path (resize, pad, decode, thresholds) with either backend
    field = np.random.default_rng(2).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    pt, po = predict_field(m, field, 0.64, 0.2), predict_field(onnx_det, field, 0.64, 0.2)
    _same_boxes({"labels": torch.from_numpy(pt.labels), "boxes": torch.from_numpy(pt.boxes),
                 "scores": torch.from_numpy(pt.scores)},
                {"labels": torch.from_numpy(po.labels), "boxes": torch.from_numpy(po.boxes),
                 "scores": torch.from_numpy(po.scores)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch run's checkpoint with its heatmap head spread out, and its fields.

    One epoch leaves every score near the initial 0.01, so peaks would be ties decided by float
    rounding; the spread head gives distinct peaks, as a trained model has.
    """
    from leukolab.checkpoints import load_checkpoint
    from leukolab.pipelines.detect import train_detector

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx")
    fields = make_smears(root / "fields", 6, width=128, height=96, seed=3, scale=0.3, progress=False)
    run = train_detector(root / "runs", overrides={
        "data.path": str(fields), "data.img_size": 128, "data.batch_size": 4, "train.epochs": 1,
        "model.detector_kwargs": {"backbone": "resnet10t", "channels": 16}, "train.progress": False,
        "data.check_images": False,
    })
    state = load_checkpoint(run / "best.pt")
    gen = torch.Generator().manual_seed(0)
    weight = state["objective"]["model.heatmap.2.weight"]
    state["objective"]["model.heatmap.2.weight"] = torch.randn(weight.shape, generator=gen) * 0.5
    state["objective"]["model.heatmap.2.bias"].fill_(-1.0)
    torch.save(state, root / "spread.pt")
    return root / "spread.pt", fields


@needs_onnx
def test_export_command_and_predict_backend_onnx(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    run, fields = tiny_run
    code, out, _ = _run(["detect", "export", run, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 0 and "wrote" in out
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["classes"] == ["platelets", "rbc", "wbc"] and meta["img_size"] == 128 and meta["out_stride"] == 4
    code, _, err = _run(["detect", "export", run, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and err.startswith("error:") and "exists" in err  # never overwritten
    boxes = {}
    for backend in ("torch", "onnx"):
        code, _, err = _run(["detect", "predict", run, fields / "images", "--out", tmp_path / backend,
                             "--score", 0.2, "--no-draw", "--backend", backend], capsys)
        assert code == 0, err
        keys = ["image", "class", "x1", "y1", "x2", "y2"]
        boxes[backend] = pd.read_csv(tmp_path / backend / "boxes.csv").sort_values(keys).reset_index(drop=True)
    a, b = boxes["torch"], boxes["onnx"]
    assert len(a) == len(b) > 20
    np.testing.assert_allclose(a["score"], b["score"], atol=2e-4)
    assert (a[["image", "class"]] == b[["image", "class"]]).all().all()
    np.testing.assert_allclose(a[["x1", "y1", "x2", "y2"]].to_numpy(), b[["x1", "y1", "x2", "y2"]].to_numpy(),
                               atol=0.11)  # CSV keeps 0.1 px


def test_backend_onnx_without_onnxruntime_is_one_line(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, fields = tiny_run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    code, _, err = _run(["detect", "predict", run, fields / "images", "--out", tmp_path / "p", "--backend", "onnx"],
                        capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "pip install 'leukolab[onnx]'" in err and "onnxruntime" in err
    assert not (tmp_path / "p").exists()
    code, _, err = _run(["detect", "predict", run, fields / "images", "--out", tmp_path / "p", "--backend", "trt"],
                        capsys)
    assert code == 2 and "expected one of torch, onnx" in err
