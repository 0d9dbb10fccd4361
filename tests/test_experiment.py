from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from leukolab.errors import LeukolabError
from leukolab.pipelines import experiment


def test_label_efficiency_writes_tables_and_resumes_without_redoing_cells(
    tiny_run: Path, wbc_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 1, "data.batch_size": 16, "optim.warmup_epochs": 0}
    calls: list[str] = []
    interrupt = [True]
    real_train = experiment.train_classifier

    def counting_train(*args: object, **kwargs: object) -> Path:
        calls.append(str(kwargs.get("name")))
        if len(calls) == 3 and interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt  # interrupt the experiment mid-way, once
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "train_classifier", counting_train)
    out = tmp_path / "exp"
    args = (wbc_small, out, {"pre": str(tiny_run)}, (1.0, 0.5), 1, over)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_label_efficiency(*args, log=lambda _: None)
    done = pd.read_csv(out / "label_efficiency.csv")
    assert len(done) == 2
    calls.clear()
    experiment.run_label_efficiency(*args, log=lambda _: None)
    # 2 scratch + 2 pretrained fine-tune + 2 pretrained linear = 6 cells; 2 were done before
    assert len(calls) == 4
    results = pd.read_csv(out / "label_efficiency.csv")
    assert len(results) == 6 and results[["init", "mode", "fraction", "seed"]].duplicated().sum() == 0
    assert set(results["mode"]) == {"finetune", "linear"}
    assert results["balanced_accuracy"].between(0, 1).all()
    md = (out / "label_efficiency.md").read_text()
    assert "| scratch | finetune |" in md and "| pre | linear |" in md and "±" in md
    assert (out / "label_efficiency.png").stat().st_size > 1000
    # the pretrained backbone's architecture is used for every cell
    for run in results["run"]:
        assert "resnet10t" in Path(run, "config.yaml").read_text()


def test_a_changed_setup_is_refused(tiny_run: Path, wbc_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.yaml").write_text("data: elsewhere\n")
    with pytest.raises(LeukolabError, match="different setup"):
        experiment.run_label_efficiency(wbc_small, out, {"pre": str(tiny_run)}, (1.0,), 1, log=lambda _: None)
    with pytest.raises(LeukolabError, match="does not exist"):
        experiment.run_label_efficiency(wbc_small, tmp_path / "x", {"pre": "/nope"}, (1.0,), 1)
    with pytest.raises(LeukolabError, match="outside"):
        experiment.run_label_efficiency(wbc_small, tmp_path / "x", {}, (0.0,), 1)
