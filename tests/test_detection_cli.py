"""``leukolab synth smears`` and ``leukolab detect ...``: the commands, their outputs and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.synthetic.smears import make_smears


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_smears(tmp_path_factory.mktemp("cli") / "fields", 12, width=128, height=96, seed=11, scale=0.3,
                       progress=False)


@pytest.fixture(scope="module")
def tiny_detector(fields: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leukolab.pipelines.detect import train_detector

    out = tmp_path_factory.mktemp("detruns")
    return train_detector(out, overrides={
        "data.path": str(fields), "data.img_size": 128, "data.batch_size": 4, "train.epochs": 2,
        "model.detector_kwargs": {"backbone": "resnet10t", "channels": 16}, "train.progress": False,
        "data.check_images": True, "optim.lr": 3e-3,
    })


def test_synth_smears_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["synth", "smears", tmp_path / "s", "--n", 2, "--width", 96, "--height", 64, "--seed", 4,
                         "--scale", 0.25, "--no-progress"], capsys)
    assert code == 0 and "wrote" in out
    assert len(list((tmp_path / "s" / "images").glob("*.jpg"))) == 2
    code, _, err = _run(["synth", "smears", tmp_path / "s", "--n", 1], capsys)
    assert code == 2 and err.startswith("error:") and "not empty" in err


def test_detect_stats(fields: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["detect", "stats", fields], capsys)
    assert code == 0 and "VOC layout, 12 images" in out
    for name in ("wbc", "rbc", "platelets", "width_median"):
        assert name in out
    from leukolab.pipelines.detect import detection_stats

    table = detection_stats(fields)
    boxes = pd.read_csv(fields / "boxes.csv")
    assert table.loc["all", "boxes"] == len(boxes)
    assert table.loc["wbc", "boxes"] == (boxes["label"] == "WBC").sum()
    assert table.loc["wbc", "width_median"] == pytest.approx((boxes.x2 - boxes.x1)[boxes.label == "WBC"].median())


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, fields: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "a.png")
    cases = [
        (["detect", "stats", tmp_path / "plain"], "not a detection data set"),
        (["detect", "train", tmp_path / "plain", "--out", tmp_path / "runs"], "not a detection data set"),
        (["detect", "train", fields, "--detector", "yolo9000", "--out", tmp_path / "runs"], "unknown detector"),
        (["detect", "train", fields, "--img-size", 100, "--out", tmp_path / "runs"], "multiple of 32"),
        (["detect", "evaluate", tmp_path / "plain"], "no best.pt"),
    ]
    for args, needle in cases:
        code, _, err = _run(args, capsys)
        assert code == 2, args
        assert err.startswith("error:") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_train_evaluate_predict(tiny_detector: Path, fields: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_detector
    for name in ("config.yaml", "splits.csv", "history.csv", "curves.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert {"val_map50", "val_map50_95", "train_heatmap", "train_box"} <= set(history.columns)
    assert set(pd.read_csv(run / "splits.csv")["split"]) == {"train", "val"}

    code, out, _ = _run(["detect", "evaluate", run, "--data", fields, "--out", tmp_path / "ev"], capsys)
    assert code == 0 and "mAP50" in out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"ap50", "map50", "map50_95", "ap50_95", "precision", "recall", "counts"} <= set(m)
    assert set(m["ap50"]) == {"platelets", "rbc", "wbc"} and 0.0 <= m["map50"] <= 1.0
    assert m["counts"]["images"] == 12
    assert (tmp_path / "ev" / "pr_wbc.png").is_file() and len(list((tmp_path / "ev" / "examples").glob("*.png"))) == 4
    assert m["tta"] is False
    code, out, _ = _run(["detect", "evaluate", run, "--data", fields, "--out", tmp_path / "ev_tta", "--tta"], capsys)
    m_tta = json.loads((tmp_path / "ev_tta" / "metrics.json").read_text())
    assert code == 0 and m_tta["tta"] is True and m_tta["counts"]["images"] == 12
    assert m_tta["map50_95"] != m["map50_95"]  # four flips averaged: other scores and boxes

    code, out, _ = _run(["detect", "predict", run, fields / "images", "--out", tmp_path / "pred", "--score", 0.05,
                         "--class-score", "wbc=0.1"], capsys)
    assert code == 0
    boxes = pd.read_csv(tmp_path / "pred" / "boxes.csv")
    assert list(boxes.columns) == ["image", "class", "score", "x1", "y1", "x2", "y2"]
    assert (boxes["score"] >= 0.05).all() and (boxes.loc[boxes["class"] == "wbc", "score"] >= 0.1).all()
    counts = pd.read_csv(tmp_path / "pred" / "counts.csv")
    assert len(counts) == 12 and counts[["platelets", "rbc", "wbc"]].to_numpy().sum() == len(boxes)
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert len(results) == len(boxes)
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert len(list((tmp_path / "pred" / "annotated").glob("*.png"))) == 12

    # a test set with another class list, a tile smaller than the largest cell, an existing output folder
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "labels").mkdir()
    Image.fromarray(np.full((96, 128, 3), 200, np.uint8)).save(other / "images" / "a.png")
    (other / "classes.txt").write_text("WBC\nBlast\n")
    (other / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    for args, needle in (
        (["detect", "evaluate", run, "--data", other], "differ from the model's"),
        (["detect", "predict", run, fields / "images", "--out", tmp_path / "p2", "--tile", "--tile-size", 16],
         "not larger than the largest box"),
        (["detect", "predict", run, fields / "images", "--out", tmp_path / "pred"], "not empty"),
        (["detect", "predict", run, fields / "images", "--out", tmp_path / "p3", "--class-score", "blast=0.2"],
         "unknown class"),
    ):
        code, _, err = _run(args, capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, err


def test_top_level_stats_dispatches_to_boxes(fields: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["stats", fields], capsys)
    assert code == 0 and "VOC layout, 12 images" in out and "width_median" in out
