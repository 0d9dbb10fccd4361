"""``leukolab smear crops``: typed white cells of annotated fields as an ImageFolder test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.crops import square_around
from leukolab.data.readers import list_images
from leukolab.data.synthetic.smears import make_smears
from leukolab.pipelines.smear_crops import write_smear_crops


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_smears(tmp_path_factory.mktemp("smears") / "fields", 4, width=160, height=128, seed=1,
                       progress=False)


def test_crops_are_the_typed_white_cells_in_type_folders(fields: Path, tmp_path: Path) -> None:
    boxes = pd.read_csv(fields / "boxes.csv")
    wbc = boxes[boxes["label"] == "WBC"].reset_index(drop=True)
    assert len(wbc) >= 2
    # one white cell loses its type: it must be skipped, the others keep their place index
    truth = boxes.copy()
    first = truth.index[truth["label"] == "WBC"][0]
    truth.loc[first, "wbc_type"] = np.nan
    truth.to_csv(tmp_path / "truth.csv", index=False)
    res = write_smear_crops(fields, tmp_path / "truth.csv", tmp_path / "out", margin=0.25, progress=False)
    files = list_images(tmp_path / "out")
    assert len(files) == len(wbc) - 1 == sum(res.counts.values()) and res.untyped == 1
    expected = wbc["wbc_type"].str.lower().iloc[1:].value_counts().to_dict()
    assert res.counts == expected
    assert {p.parent.name for p in files} == set(expected)
    row = wbc.iloc[1]
    idx = int((wbc["image"].iloc[:2] == row["image"]).sum() - 1)
    crop = tmp_path / "out" / row["wbc_type"].lower() / f"{Path(row['image']).stem}_{idx}.png"
    x1, y1, x2, y2 = square_around((row.x1, row.y1, row.x2, row.y2), 0.25)
    assert Image.open(crop).size == (x2 - x1, y2 - y1)
    table = pd.read_csv(tmp_path / "out" / "crops.csv")
    assert len(table) == len(files) and set(table["type"]) == set(expected)


def test_cli_prints_counts_and_never_overwrites(fields: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["smear", "crops", str(fields), "--truth", str(fields / "boxes.csv"), "--out", str(tmp_path / "c"),
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "crops (" in out and "skipped 0 untyped" in out
    before = sorted(p.name for p in (tmp_path / "c").rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == before


def test_cli_bad_inputs_exit_2_with_one_line(fields: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.csv"
    other.write_text("image,xmin,ymin,xmax,ymax,wbc_type_if_unambiguous\nnot_here.jpg,1,1,5,5,NEUTROPHIL\n")
    cases = [(["--truth", str(other)], "none of its 1 images"),
             (["--truth", str(fields / "boxes.csv"), "--margin", "-1"], "--margin -1"),
             (["--truth", str(tmp_path / "missing.csv")], "cannot read it as CSV")]
    for extra, message in cases:
        assert main(["smear", "crops", str(fields), "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
