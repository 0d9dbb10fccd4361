from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from leukolab.cli.main import main


def test_quick_full_demo_writes_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--quick", "--full", "--no-progress", "--out", str(tmp_path), "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    root = next(tmp_path.iterdir())
    assert (root / "runs").is_dir() and "balanced accuracy" in out
    assert len(list((root / "data_full" / "basophil").glob("*.png"))) == 40  # its own labelled set
    pre = next((root / "pretrain").iterdir())
    assert (pre / "last.pt").is_file() and (pre / "reconstructions.png").is_file()
    results = pd.read_csv(root / "label_efficiency" / "label_efficiency.csv")
    # scratch and MAE fine-tune, MAE linear probe, at 10 % and 1 % labels
    assert set(zip(results["init"], results["mode"], strict=True)) == {
        ("scratch", "finetune"), ("mae", "finetune"), ("mae", "linear")}
    assert sorted(results["fraction"].unique()) == [0.01, 0.1]
    assert results["balanced_accuracy"].between(0, 1).all()
    assert "| scratch | finetune |" in out and "pretraining" in out
