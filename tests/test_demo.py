from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from leukolab.cli.main import main


@pytest.mark.slow
def test_quick_full_demo_writes_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--quick", "--full", "--no-progress", "--out", str(tmp_path), "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    root = next(tmp_path.iterdir())
    assert (root / "runs").is_dir() and "balanced accuracy" in out
    # the quick demo's 2 epochs on 30 test images say little about the test set, but the classifier must have
    # fitted its training data: the loss falls and the training accuracy leaves chance (0.2 for 5 classes)
    hist = pd.read_csv(next((root / "runs").glob("*/history.csv")))
    assert hist["train_loss"].iloc[-1] < 0.8 * hist["train_loss"].iloc[0], hist
    assert hist["train_acc"].iloc[-1] > 0.4, hist
    metrics = json.loads(next((root / "runs").glob("*/eval/metrics.json")).read_text())
    assert f"balanced accuracy {metrics['balanced_accuracy']:.3f}" in out  # the summary printed is the file's
    assert len(list((root / "data_full" / "basophil").glob("*.png"))) == 40  # its own labelled set
    pre = next((root / "pretrain").iterdir())
    assert (pre / "last.pt").is_file() and (pre / "reconstructions.png").is_file()
    results = pd.read_csv(root / "label_efficiency" / "label_efficiency.csv")
    # scratch and MAE fine-tune, MAE linear probe, at 10 % and 1 % labels
    assert set(zip(results["init"], results["mode"], strict=True)) == {
        ("scratch", "finetune"), ("mae", "finetune"), ("mae", "linear")}
    assert sorted(results["fraction"].unique()) == [0.01, 0.1]
    # each row holds the metrics its own cell's evaluation wrote
    for row in results.itertuples():
        cell = json.loads(next(Path(row.run).glob("eval*/metrics.json")).read_text())
        assert row.balanced_accuracy == pytest.approx(cell["balanced_accuracy"], rel=1e-12)
        assert row.f1_macro == pytest.approx(cell["f1_macro"], rel=1e-12)
        assert row.n_classes == len(cell["class_names"]) == 5
    assert "| scratch | finetune |" in out and "pretraining" in out
