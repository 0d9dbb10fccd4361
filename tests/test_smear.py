"""``leukolab smear``: crop geometry, differential tables, comparison with truth, and the commands end to end."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.crops import (
    boxes_overlap,
    crop_square,
    field_fill,
    random_squares,
    reflect_index,
    square_around,
    white_cell_class,
)
from leukolab.data.synthetic.smears import make_smears
from leukolab.errors import LeukolabError
from leukolab.evaluation.differential import differential_table, match_truth, truth_table

CLASSES = ["background", "basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def _run(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- crop geometry
def test_square_around_is_centred_with_the_margin_on_each_side() -> None:
    assert square_around((10, 20, 30, 60), 0.5) == (-20, 0, 60, 80)  # side 2 x 40, centre (20, 40)
    assert square_around((10, 20, 30, 60), 0.0) == (0, 20, 40, 60)  # side = the longer box side
    assert square_around((0, 0, 2, 2), 0.25) == (0, 0, 3, 3)  # side 3, corner -0.5 rounds half up to 0
    assert square_around((0, 0, 3, 5), 0.0) == (-1, 0, 4, 5)
    assert square_around((5.2, 5.2, 5.4, 5.4), 0.0) == (5, 5, 6, 6)  # at least one pixel
    with pytest.raises(LeukolabError, match="margin"):
        square_around((0, 0, 2, 2), -0.1)


def test_crop_inside_the_field_is_the_plain_slice() -> None:
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    np.testing.assert_array_equal(crop_square(image, (2, 1, 5, 4)), image[1:4, 2:5])


def test_crop_pads_with_the_field_median_colour() -> None:
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[..., 0] = 10
    image[1:, :, 1] = 200  # median of channel 1: 200 (15 of 20 pixels)
    image[0, 0] = (1, 2, 3)
    np.testing.assert_array_equal(field_fill(image), [10, 200, 0])
    crop = crop_square(image, (-2, -1, 3, 3), pad="median")
    assert crop.shape == (4, 5, 3)
    np.testing.assert_array_equal(crop[0], np.tile([10, 200, 0], (5, 1)))  # the row above the field
    np.testing.assert_array_equal(crop[:, :2], np.tile([10, 200, 0], (4, 2, 1)))  # the columns left of it
    np.testing.assert_array_equal(crop[1:, 2:], image[:3, :3])
    outside = crop_square(image, (10, 10, 13, 12), pad="median", fill=np.array([7, 8, 9]))
    np.testing.assert_array_equal(outside, np.tile([7, 8, 9], (2, 3, 1)))


def test_crop_reflects_at_the_border_like_numpy_pad() -> None:
    np.testing.assert_array_equal(reflect_index(np.arange(-2, 7), 5), [2, 1, 0, 1, 2, 3, 4, 3, 2])
    np.testing.assert_array_equal(reflect_index(np.arange(-3, 3), 1), np.zeros(6))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (7, 9, 3), dtype=np.uint8)
    padded = np.pad(image, ((3, 4), (2, 5), (0, 0)), mode="reflect")  # origin moves to (3, 2)
    crop = crop_square(image, (-2, -3, 11, 8), pad="reflect")
    np.testing.assert_array_equal(crop, padded[0:11, 0:13])
    with pytest.raises(LeukolabError, match="pad"):
        crop_square(image, (-1, -1, 2, 2), pad="wrap")  # type: ignore[arg-type]


def test_random_squares_stay_clear_of_white_cells_and_inside_the_field() -> None:
    avoid = np.array([[10, 10, 40, 40], [60, 5, 90, 35]], dtype=float)
    squares = random_squares(100, 80, 20, avoid, 30, np.random.default_rng(1))
    assert len(squares) == 30
    for x1, y1, x2, y2 in squares:
        assert x2 - x1 == y2 - y1 == 20 and 0 <= x1 and 0 <= y1 and x2 <= 100 and y2 <= 80
        assert not boxes_overlap((x1, y1, x2, y2), avoid).any()
    assert squares == random_squares(100, 80, 20, avoid, 30, np.random.default_rng(1))
    assert random_squares(100, 80, 20, np.array([[0, 0, 100, 80]]), 3, np.random.default_rng(0)) == []
    assert random_squares(30, 30, 40, avoid, 3, np.random.default_rng(0)) == []  # larger than the field


def test_white_cell_class_choice() -> None:
    assert white_cell_class(["rbc", "wbc", "platelets"]) == 1
    assert white_cell_class(["Platelets", "White_Blood-Cell"]) == 1
    assert white_cell_class(["cell"]) == 0  # a one-class detector
    assert white_cell_class(["rbc", "wbc"], "RBC") == 0
    with pytest.raises(LeukolabError, match="--cell-class"):
        white_cell_class(["rbc", "platelets"])
    with pytest.raises(LeukolabError, match="not a class of the detector"):
        white_cell_class(["rbc", "wbc"], "blast")


# --------------------------------------------------------------------------- tables and truth
def _cells(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image", "x1", "y1", "x2", "y2", "detector_score", "type"])


def test_differential_table_counts_types_and_leaves_background_out_of_percentages() -> None:
    cells = _cells([("a", 0, 0, 1, 1, 0.9, "neutrophil"), ("a", 0, 0, 1, 1, 0.9, "neutrophil"),
                    ("a", 0, 0, 1, 1, 0.9, "lymphocyte"), ("a", 0, 0, 1, 1, 0.9, "background"),
                    ("c", 0, 0, 1, 1, 0.9, "eosinophil")])
    table = differential_table(cells, ["a", "b", "c"], CLASSES).set_index("image")
    assert list(table.index) == ["a", "b", "c", "TOTAL"]
    assert table.loc["a", "cells"] == 3 and table.loc["a", "background"] == 1
    assert table.loc["a", "neutrophil_pct"] == pytest.approx(66.67) and table.loc["a", "lymphocyte_pct"] == 33.33
    assert table.loc["b", "cells"] == 0 and np.isnan(table.loc["b", "neutrophil_pct"])  # no cells: no percentage
    assert table.loc["TOTAL", "cells"] == 4 and table.loc["TOTAL", "background"] == 1
    assert table.loc["TOTAL", "neutrophil_pct"] == 50.0 and table.loc["TOTAL", "eosinophil_pct"] == 25.0
    assert "background_pct" not in table.columns


def test_truth_table_reads_bccd_and_synthetic_layouts() -> None:
    bccd = pd.DataFrame({"image": ["BloodImage_00000.jpg", "BloodImage_00010.jpg"], "voc_split": "trainval",
                         "xmin": [260, 1], "ymin": [177, 2], "xmax": [491, 30], "ymax": [376, 40],
                         "wbc_type_if_unambiguous": ["NEUTROPHIL", np.nan]})
    t = truth_table(bccd)
    assert list(t.columns) == ["image", "x1", "y1", "x2", "y2", "type"]
    assert list(t["type"]) == ["neutrophil", ""] and t.loc[0, "x2"] == 491.0
    synth = pd.DataFrame({"image": ["s.jpg"] * 3, "label": ["WBC", "RBC", "Platelets"], "x1": [1, 2, 3],
                          "y1": [1, 2, 3], "x2": [9, 9, 9], "y2": [9, 9, 9], "wbc_type": ["monocyte", "", ""]})
    assert truth_table(synth)[["image", "type"]].values.tolist() == [["s.jpg", "monocyte"]]
    with pytest.raises(LeukolabError, match="type"):
        truth_table(bccd.drop(columns="wbc_type_if_unambiguous"))


def test_match_truth_recall_typing_and_differential_error() -> None:
    truth = truth_table(pd.DataFrame({
        "image": ["a.jpg", "a.jpg", "b.jpg", "c.jpg"], "xmin": [0, 20, 0, 0], "ymin": [0, 20, 0, 0],
        "xmax": [10, 30, 10, 10], "ymax": [10, 30, 10, 10],
        "wbc_type_if_unambiguous": ["NEUTROPHIL", "LYMPHOCYTE", "EOSINOPHIL", np.nan]}))
    cells = _cells([("/x/a.jpg", 0, 0, 10, 9, 0.9, "neutrophil"),  # right
                    ("/x/a.jpg", 21, 21, 30, 30, 0.8, "neutrophil"),  # a lymphocyte, typed wrong
                    ("/x/a.jpg", 50, 50, 60, 60, 0.7, "background"),  # a false detection, rejected
                    ("/x/c.jpg", 1, 0, 10, 10, 0.9, "monocyte")])  # an untyped cell
    cmp = match_truth(cells, truth, fields=["/x/a.jpg", "/x/b.jpg", "/x/c.jpg", "/x/d.jpg"])
    m = cmp.metrics
    assert m["typed_cells"] == 3 and m["annotated_cells"] == 4
    assert m["detection_recall"] == pytest.approx(2 / 3) and m["detection_recall_all"] == pytest.approx(3 / 4)
    assert m["typing_accuracy"] == 0.5 and m["typing_balanced_accuracy"] == 0.5  # neutrophil 1/1, lymphocyte 0/1
    assert m["end_to_end_recall"] == pytest.approx(1 / 3)
    assert m["false_detections"] == 1 and m["false_detections_called_background"] == 1
    assert m["fields_without_truth_rows"] == 1  # d.jpg: analysed, holds no annotated cell
    fields = cmp.fields.set_index("image")
    assert fields.loc["a.jpg", "differential_error"] == pytest.approx(0.5)  # {n: 1} vs {n: .5, l: .5}
    assert fields.loc["b.jpg", "differential_error"] == 1.0  # its eosinophil was missed
    assert np.isnan(fields.loc["c.jpg", "differential_error"])  # its type is unknown
    assert m["differential_fields"] == 2 and m["differential_error"] == pytest.approx(0.75)
    assert m["count_error"] == pytest.approx(1 / 4)  # a 0, b 1, c 0, d 0
    assert m["pooled_differential_error"] == pytest.approx(2 / 3, abs=1e-4)  # {n: 1} vs {n, l, e: 1/3 each}
    row = cmp.matches.iloc[1]
    assert row["true_type"] == "lymphocyte" and row["detected"] and row["predicted_type"] == "neutrophil"


def test_match_truth_one_detection_takes_one_cell() -> None:
    truth = truth_table(pd.DataFrame({"image": ["a.jpg"] * 2, "x1": [0, 4], "y1": [0, 0], "x2": [10, 14],
                                      "y2": [10, 10], "type": ["monocyte", "monocyte"]}))
    cells = _cells([("a.jpg", 2, 0, 12, 10, 0.9, "monocyte")])
    assert match_truth(cells, truth).metrics["detection_recall"] == 0.5


# --------------------------------------------------------------------------- the commands
def _wbc_only(fields: Path, out: Path) -> Path:
    """A YOLO copy of synthetic smears with only the white cells annotated (a one-class detector learns fast)."""
    (out / "labels").mkdir(parents=True)
    shutil.copytree(fields / "images", out / "images")
    (out / "classes.txt").write_text("WBC\n")
    boxes = pd.read_csv(fields / "boxes.csv")
    for path in sorted((out / "images").glob("*.jpg")):
        w, h = Image.open(path).size
        rows = boxes[(boxes["image"] == path.name) & (boxes["label"] == "WBC")]
        (out / "labels" / f"{path.stem}.txt").write_text("".join(
            f"0 {(r.x1 + r.x2) / 2 / w} {(r.y1 + r.y2) / 2 / h} {(r.x2 - r.x1) / w} {(r.y2 - r.y1) / h}\n"
            for r in rows.itertuples()))
    return out


def _train_detector(data: Path, out: Path, epochs: int) -> Path:
    from leukolab.pipelines.detect import train_detector

    return train_detector(out, overrides={
        "data.path": str(data), "data.img_size": 128, "data.batch_size": 4, "train.epochs": epochs,
        "model.detector_kwargs": {"backbone": "resnet10t", "channels": 16}, "train.progress": False,
        "data.check_images": False, "optim.lr": 5e-3, "optim.warmup_epochs": 0, "seed": 0,
    })


@pytest.fixture(scope="module")
def smears(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 easy synthetic fields (128 x 96 px, white cells ~40-65 px) whose white-cell types are known."""
    return make_smears(tmp_path_factory.mktemp("smear") / "fields", 24, width=128, height=96, seed=11, scale=0.3,
                       difficulty=0.0, progress=False)


@pytest.fixture(scope="module")
def wbc_fields(smears: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wbc_only(smears, tmp_path_factory.mktemp("smear") / "wbc")


@pytest.fixture(scope="module")
def quick_detector(wbc_fields: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch white-cell detector (scores ~0.01: use --score 0.005): for the plumbing, not for accuracy."""
    return _train_detector(wbc_fields, tmp_path_factory.mktemp("quickdet"), 1)


@pytest.fixture(scope="module")
def quick_classifier(wbc_small: Path, tiny_overrides, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leukolab.pipelines.classify import train_classifier

    return train_classifier(tmp_path_factory.mktemp("quickcls"), overrides=tiny_overrides(wbc_small,
                                                                                          **{"train.epochs": 1}))


def _analyse(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _run(["smear", "analyse", *args, "--no-progress"], capsys)


def test_analyse_writes_cells_differential_and_a_report(
    smears: Path, quick_detector: Path, quick_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((smears / "images").glob("*.jpg"))[:4]
    out = tmp_path / "an"
    code, stdout, err = _analyse([*images, "--detector", quick_detector, "--classifier", quick_classifier,
                                  "--classifier", quick_classifier, "--score", 0.005, "--out", out], capsys)
    assert code == 0, err
    assert "differential.csv" in stdout
    classes = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns) == ["image", "x1", "y1", "x2", "y2", "detector_score", "type",
                                   *(f"p_{c}" for c in classes)]
    assert len(cells) > 0 and (cells["detector_score"] >= 0.005).all()
    probs = cells[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    assert (cells["type"] == np.array(classes)[probs.argmax(1)]).all()
    table = pd.read_csv(out / "differential.csv").set_index("image")
    assert list(table.index) == [*map(str, images), "TOTAL"]
    assert table.loc["TOTAL", "cells"] == len(cells) == table["cells"].iloc[:-1].sum()
    for c in classes:
        assert table.loc["TOTAL", c] == (cells["type"] == c).sum()
    assert table.loc["TOTAL", [f"{c}_pct" for c in classes]].sum() == pytest.approx(100.0, abs=0.05)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fields"] == 4 and summary["cells"] == len(cells) and summary["cell_class"] == "wbc"
    assert summary["options"]["margin"] == 0.5 and summary["options"]["pad"] == "reflect"
    assert sorted(p.name for p in (out / "annotated").glob("*.png")) == [f"{p.stem}.png" for p in images]
    assert (out / "differential.png").is_file()

    # an ensemble folder is one --classifier; two copies of one run average to that run
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.yaml").write_text(f"members: [{quick_classifier}, {quick_classifier}]\nweights: [0.3, 0.7]\n"
                                       f"class_names: [{', '.join(classes)}]\n")
    for name, cls in (("single", quick_classifier), ("ensemble", ens)):
        code, _, err = _analyse([*images, "--detector", quick_detector, "--classifier", cls, "--score", 0.005,
                                 "--no-draw", "--out", tmp_path / name], capsys)
        assert code == 0, err
        other = pd.read_csv(tmp_path / name / "cells.csv")
        pd.testing.assert_frame_equal(other.drop(columns="type"), cells.drop(columns="type"), atol=2e-4)
    assert not (tmp_path / "single" / "annotated").exists()

    code, _, err = _run(["report", out], capsys)
    assert code == 0, err
    page = (out / "report.html").read_text()
    for needle in ("differential count", "neutrophil_pct", "smear analysis summary",
                   f"annotated field {images[0].stem}", "data:image/png;base64"):
        assert needle in page, needle


def test_fields_without_detections_are_zero_cells(
    smears: Path, quick_detector: Path, quick_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = tmp_path / "empty.png"
    Image.fromarray(np.full((96, 128, 3), (236, 222, 216), np.uint8)).save(blank)  # plasma only
    image = sorted((smears / "images").glob("*.jpg"))[0]
    out = tmp_path / "an"  # the 1-epoch detector scores nothing above the default 0.3
    code, _, err = _analyse([blank, image, "--detector", quick_detector, "--classifier", quick_classifier, "--out",
                             out], capsys)
    assert code == 0, err
    assert len(pd.read_csv(out / "cells.csv")) == 0
    table = pd.read_csv(out / "differential.csv")
    assert list(table["image"]) == [str(blank), str(image), "TOTAL"]
    assert (table[["cells", "background", "neutrophil"]] == 0).all().all() and table["neutrophil_pct"].isna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 0 and summary["fields_without_cells"] == 2
    assert (out / "differential.png").is_file() and (out / "annotated" / "empty.png").is_file()


def test_analyse_bad_inputs_exit_2_with_one_line(
    smears: Path, quick_detector: Path, quick_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sorted((smears / "images").glob("*.jpg"))[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    cases = [
        (["--detector", quick_detector, "--classifier", quick_detector], "--classifier"),
        (["--detector", quick_classifier, "--classifier", quick_classifier], "--detector"),
        (["--detector", quick_detector, "--classifier", quick_classifier, "--cell-class", "rbc"], "--cell-class"),
        (["--detector", quick_detector, "--classifier", quick_classifier, "--margin", -1], "--margin"),
        (["--detector", quick_detector, "--classifier", quick_classifier, "--pad", "wrap"], "--pad"),
        (["--detector", quick_detector, "--classifier", quick_classifier, "--truth", smears / "classes.txt"],
         "truth"),
    ]
    for args, needle in cases:
        code, _, err = _analyse([image, *args, "--out", tmp_path / "out"], capsys)
        assert code == 2, (args, err)
        assert err.startswith("error:") and needle in err and err.count("\n") == 1, err
    code, _, err = _analyse([image, "--detector", quick_detector, "--classifier", quick_classifier, "--out",
                             tmp_path / "full"], capsys)
    assert code == 2 and "not empty" in err
    assert not (tmp_path / "out").exists()


def test_mine_background_crops_stay_clear_of_white_cells(
    wbc_fields: Path, quick_detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["smear", "mine-background", wbc_fields, "--detector", quick_detector, "--out",
                         tmp_path / "bg", "--per-field", 3, "--seed", 1, "--score", 0.005, "--no-progress"], capsys)
    assert code == 0, err
    crops = pd.read_csv(tmp_path / "bg" / "crops.csv")
    assert set(crops["kind"]) == {"detection", "random"}
    assert crops.groupby("image").size().max() <= 3
    from leukolab.data.detection import read_detection
    from leukolab.evaluation.differential import _iou

    data = {str(it.image): it.boxes for it in read_detection(wbc_fields).items}
    side = int(np.median([max(b[2] - b[0], b[3] - b[1]) for bs in data.values() for b in bs]).round())
    for row in crops.itertuples():
        box = np.array([[row.x1, row.y1, row.x2, row.y2]])
        assert (_iou(box, data[row.image]) < 0.1).all()
        if row.kind == "random":
            assert row.x2 - row.x1 == side and not boxes_overlap(box[0], data[row.image]).any()
        crop = (row.crop_x1, row.crop_y1, row.crop_x2, row.crop_y2)  # the CSV's boxes are rounded to 0.1 px
        assert np.abs(np.subtract(crop, square_around(box[0], 0.5))).max() <= 1
        with Image.open(tmp_path / "bg" / row.file) as im:
            assert im.size == (row.crop_x2 - row.crop_x1, row.crop_y2 - row.crop_y1)
    assert len(list((tmp_path / "bg").glob("*.jpg"))) == len(crops)
    code, _, err = _run(["smear", "mine-background", wbc_fields, "--detector", quick_detector, "--out",
                         tmp_path / "bg2", "--per-field", 0], capsys)
    assert code == 2 and "--per-field" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _analyse_worker(rank: int, world: int, port: int, images: list[str], det: str, cls: str, out: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from leukolab.pipelines import smear

    smear.BLOCK = 2  # several gather rounds, the last one uneven
    options = smear.SmearOptions(score=0.005, device="cpu", progress=False)
    result = smear.analyse_smears(images, det, [cls], out, options)
    assert (result is None) == (rank != 0)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and load the models (~15 s on 2 idle cores)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_processes_write_what_one_process_writes(
    smears: Path, quick_detector: Path, quick_classifier: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    from leukolab.pipelines.smear import SmearOptions, analyse_smears

    images = [str(p) for p in sorted((smears / "images").glob("*.jpg"))[:7]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the workers
    try:
        analyse_smears(images, quick_detector, [quick_classifier], tmp_path / "one",
                       SmearOptions(score=0.005, device="cpu", progress=False))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_analyse_worker, args=(2, _free_port(), images, str(quick_detector), str(quick_classifier),
                                    str(tmp_path / "two")), nprocs=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert len(pd.read_csv(one / "cells.csv")) > 0
    for name in ("cells.csv", "differential.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    names = sorted(p.name for p in (one / "annotated").iterdir())
    assert sorted(p.name for p in (two / "annotated").iterdir()) == names and len(names) == 7
    for p in (one / "annotated").iterdir():
        assert p.read_bytes() == (two / "annotated" / p.name).read_bytes()
    s1, s2 = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert {k: v for k, v in s1.items() if k not in ("ms_per_field", "wall_seconds", "processes")} == {
        k: v for k, v in s2.items() if k not in ("ms_per_field", "wall_seconds", "processes")}


@pytest.mark.slow
def test_differential_of_synthetic_smears_is_close_to_the_truth(
    smears: Path, wbc_fields: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leukolab.data.synthetic import make_wbc_dataset
    from leukolab.pipelines.classify import train_classifier

    detector = _train_detector(wbc_fields, tmp_path / "det", 12)  # trained on the fields it then analyses
    crops = make_wbc_dataset(tmp_path / "crops", 30, size=32, seed=0, difficulty=0.0, progress=False)
    classifier = train_classifier(tmp_path / "cls", overrides={
        "data.path": str(crops), "data.img_size": 32, "data.batch_size": 16, "model.backbone": "resnet10t",
        "model.drop_path": 0.0, "optim.lr": 3e-3, "optim.warmup_epochs": 0, "train.epochs": 6,
        "train.progress": False, "train.keep_last": 1, "seed": 0})
    out = tmp_path / "an"
    # margin 0.25: synthetic crops frame a cell tighter than PBC (cell diameter 0.5-0.8 of the crop)
    code, _, err = _analyse([smears / "images", "--detector", detector, "--classifier", classifier, "--score", 0.2,
                             "--margin", 0.25, "--truth", smears / "boxes.csv", "--out", out], capsys)
    assert code == 0, err
    truth = pd.read_csv(smears / "boxes.csv").query("label == 'WBC'")["wbc_type"].value_counts(normalize=True)
    total = pd.read_csv(out / "differential.csv").set_index("image").loc["TOTAL"]
    types = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    predicted = np.array([total[f"{t}_pct"] for t in types]) / 100
    expected = np.array([truth.get(t, 0.0) for t in types])
    assert 0.5 * np.abs(predicted - expected).sum() <= 0.2, (predicted, expected)  # total variation distance
    assert total["cells"] == pytest.approx(len(pd.read_csv(smears / "boxes.csv").query("label == 'WBC'")), rel=0.25)
    m = json.loads((out / "truth.json").read_text())
    assert m["detection_recall"] >= 0.8 and m["typing_accuracy"] >= 0.75 and m["typing_balanced_accuracy"] >= 0.75
    assert m["pooled_differential_error"] <= 0.2
