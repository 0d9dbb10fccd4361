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
    assert "| scratch | finetune |" in md and "| pre | linear |" in md and "(1 seed)" in md
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


def test_a_new_init_is_added_without_redoing_finished_cells(
    tiny_run: Path, wbc_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 1, "data.batch_size": 16, "optim.warmup_epochs": 0}
    out = tmp_path / "exp"
    experiment.run_label_efficiency(wbc_small, out, {"pre": str(tiny_run)}, (0.5,), 1, over,
                                    linear_probe=False, log=lambda _: None)
    calls: list[str] = []
    real_train = experiment.train_classifier

    def counting_train(*args: object, **kwargs: object) -> Path:
        calls.append(str(kwargs.get("name")))
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "train_classifier", counting_train)
    logs: list[str] = []
    experiment.run_label_efficiency(wbc_small, out, {"pre2": str(tiny_run), "pre": str(tiny_run)}, (0.5,), 1,
                                    over, linear_probe=False, log=logs.append)
    assert calls == ["pre2-finetune-f0.5-s0"]  # scratch and pre were done already
    assert any("adding pre2" in m for m in logs)
    assert list(experiment.read_yaml(out / "experiment.yaml")["pretrained"]) == ["pre", "pre2"]
    assert set(pd.read_csv(out / "label_efficiency.csv")["init"]) == {"scratch", "pre", "pre2"}
    # anything else changed is still refused
    with pytest.raises(LeukolabError, match="different setup"):
        experiment.run_label_efficiency(wbc_small, out, {"pre": str(tiny_run)}, (0.1,), 1, over,
                                        linear_probe=False, log=lambda _: None)


def test_collapsed_cells_are_flagged_and_rows_with_new_columns_are_kept(tmp_path: Path) -> None:
    rows = [{"init": i, "mode": "finetune", "fraction": 0.01, "seed": s, "balanced_accuracy": b,
             "f1_macro": b, "accuracy": b, "n_predicted_classes": k}
            for i, s, b, k in (("scratch", 0, 0.2, 1), ("scratch", 1, 0.3, 5), ("mae", 0, 0.6, 5))]
    path = tmp_path / "r.csv"
    experiment.append_row(path, rows[0])
    for row in rows[1:]:
        experiment.append_row(path, {**row, "n_classes": 5})  # a newer cell records the class count
    results = pd.read_csv(path)
    assert len(results) == 3 and results["n_classes"].isna().sum() == 1
    md = experiment.to_markdown(experiment.summarise(results))
    assert "⚠ 1/5 classes" in md.splitlines()[2] and "⚠" not in md.splitlines()[3]
    assert "0.250 ± 0.071" in md.splitlines()[2]  # two seeds: mean ± std
    assert "0.600 / 0.600 (1 seed)" in md.splitlines()[3] and "±" not in md.splitlines()[3]  # one: no fake 0 spread
