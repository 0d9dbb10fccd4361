"""The label-efficiency experiment: bookkeeping with training stubbed out, and one real end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from leukolab.checkpoints import BackboneSpec
from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import read_manifest
from leukolab.evaluation.metrics import classification_metrics, write_metrics
from leukolab.pipelines import experiment

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
ARCH = BackboneSpec("resnet10t", {"stem_width": 8}, img_size=32)


class FakeTraining:
    """Stands in for ``train_classifier`` / ``evaluate_run``: writes the files the experiment reads, no training.

    A cell's run folder gets its ``config.yaml`` (the overrides it was trained with); its evaluation
    predicts the true class for a share of the test images that grows with the label fraction
    (fine-tune) or is fixed (linear probe), so every cell has different, known metrics.
    """

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at

    def train(self, out: Path, overrides: dict, name: str) -> Path:
        self.calls.append(name)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # interrupt the experiment mid-way
        run = Path(out) / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(overrides))
        return run

    def evaluate(self, run: Path, check_images: bool = True, show_progress: bool = True) -> Path:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        share = 0.5 if cfg["model.freeze_backbone"] else 0.4 + 0.5 * cfg["data.label_fraction"]
        y = np.repeat(np.arange(len(CLASSES)), 20)
        pred = np.where(np.arange(y.size) % 20 < round(20 * share), y, 0)  # wrong answers all say class 0
        out = run / "eval"
        write_metrics(classification_metrics(y, pred, CLASSES), out / "metrics.json")
        return out

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeTraining:
        monkeypatch.setattr(experiment, "train_classifier", self.train)
        monkeypatch.setattr(experiment, "evaluate_run", self.evaluate)
        monkeypatch.setattr(experiment, "checkpoint_backbone_spec", lambda path: ARCH)
        return self


@pytest.fixture
def pre(tmp_path: Path) -> str:
    """A pretrained 'checkpoint' (only its existence is checked; its architecture is faked)."""
    path = tmp_path / "pre.pt"
    path.write_bytes(b"weights")
    return str(path)


def test_cells_are_recorded_as_they_finish_and_an_interrupted_experiment_resumes(
    pre: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTraining(interrupt_at=3).install(monkeypatch)
    out = tmp_path / "exp"
    args = ("data", out, {"pre": pre}, (1.0, 0.5), 1, {"train.epochs": 7})
    with pytest.raises(KeyboardInterrupt):
        experiment.run_label_efficiency(*args, log=lambda _: None)
    assert len(pd.read_csv(out / "label_efficiency.csv")) == 2  # the two finished cells
    fake.calls.clear()
    fake.interrupt_at = None
    experiment.run_label_efficiency(*args, log=lambda _: None)
    # 2 scratch + 2 pretrained fine-tune + 2 pretrained linear = 6 cells; 2 were done before
    assert fake.calls == ["pre-finetune-f1-s0", "pre-finetune-f0.5-s0", "pre-linear-f1-s0", "pre-linear-f0.5-s0"]
    results = pd.read_csv(out / "label_efficiency.csv")
    assert len(results) == 6 and results[["init", "mode", "fraction", "seed"]].duplicated().sum() == 0
    # each row holds its own cell's metrics (those the fake evaluation made for it)
    # (class 0 is always right, the other four 0.4 + 0.5 * fraction of the time: 13 of 20 at 0.5)
    row = results.set_index(["init", "mode", "fraction"]).loc[("scratch", "finetune", 0.5)]
    assert row["accuracy"] == pytest.approx((20 + 4 * 13) / 100) and row["balanced_accuracy"] == pytest.approx(0.72)
    assert row["n_classes"] == 5 and row["n_predicted_classes"] == 5
    assert results[results["mode"] == "linear"]["accuracy"].tolist() == pytest.approx([0.6, 0.6])
    # every cell: the pretrained architecture, the cell's fraction/seed/init, the shared overrides
    for r in results.itertuples():
        cfg = yaml.safe_load(Path(r.run, "config.yaml").read_text())
        assert cfg["model.backbone"] == "resnet10t" and cfg["model.backbone_kwargs"] == {"stem_width": 8}
        assert cfg["data.img_size"] == 32
        assert cfg["data.label_fraction"] == r.fraction and cfg["train.epochs"] == 7
        assert cfg["model.init"] == (None if r.init == "scratch" else str(Path(pre).resolve()))
        assert cfg["model.freeze_backbone"] == (r.mode == "linear")
    md = (out / "label_efficiency.md").read_text()
    assert "| scratch | finetune | 0.920 / " in md and "| 0.720 / " in md and "| pre | linear | 0.600 / " in md
    assert (out / "label_efficiency.png").stat().st_size > 1000
    listed = {a.path: a.kind for a in read_manifest(out)}
    assert listed == {"experiment.yaml": "config", "label_efficiency.csv": "table",
                      "label_efficiency_summary.csv": "table", "label_efficiency_table.csv": "table",
                      "label_efficiency.png": "figure"}
    table = pd.read_csv(out / "label_efficiency_table.csv")
    assert table.iloc[0, :2].tolist() == ["scratch", "finetune"] and table.iloc[0, 2].startswith("0.920 / ")


def test_a_changed_setup_is_refused(pre: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeTraining().install(monkeypatch)
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.yaml").write_text("data: elsewhere\n")
    with pytest.raises(LeukolabError, match="different setup"):
        experiment.run_label_efficiency("data", out, {"pre": pre}, (1.0,), 1, log=lambda _: None)
    with pytest.raises(LeukolabError, match="does not exist"):
        experiment.run_label_efficiency("data", tmp_path / "x", {"pre": "/nope"}, (1.0,), 1)
    with pytest.raises(LeukolabError, match="outside"):
        experiment.run_label_efficiency("data", tmp_path / "x", {}, (0.0,), 1)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_a_new_init_is_added_without_redoing_finished_cells(
    pre: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTraining().install(monkeypatch)
    out = tmp_path / "exp"
    experiment.run_label_efficiency("data", out, {"pre": pre}, (0.5,), 1, linear_probe=False, log=lambda _: None)
    assert fake.calls == ["scratch-finetune-f0.5-s0", "pre-finetune-f0.5-s0"]
    fake.calls.clear()
    logs: list[str] = []
    experiment.run_label_efficiency("data", out, {"pre2": pre, "pre": pre}, (0.5,), 1, linear_probe=False,
                                    log=logs.append)
    assert fake.calls == ["pre2-finetune-f0.5-s0"]  # scratch and pre were done already
    assert any("adding pre2" in m for m in logs)
    assert list(experiment.read_yaml(out / "experiment.yaml")["pretrained"]) == ["pre", "pre2"]
    assert set(pd.read_csv(out / "label_efficiency.csv")["init"]) == {"scratch", "pre", "pre2"}
    # anything else changed is still refused
    with pytest.raises(LeukolabError, match="different setup"):
        experiment.run_label_efficiency("data", out, {"pre": pre}, (0.1,), 1, linear_probe=False,
                                        log=lambda _: None)


def test_collapsed_cells_are_flagged_and_rows_with_new_columns_are_kept(tmp_path: Path) -> None:
    rows = [{"init": i, "mode": "finetune", "fraction": 0.01, "seed": s, "balanced_accuracy": b,
             "f1_macro": b, "accuracy": b, "n_predicted_classes": k}
            for i, s, b, k in (("scratch", 0, 0.2, 1), ("scratch", 1, 0.3, 5), ("mae", 0, 0.6, 5))]
    path = tmp_path / "label_efficiency.csv"
    experiment.append_row(path, rows[0])
    for row in rows[1:]:
        experiment.append_row(path, {**row, "n_classes": 5})  # a newer cell records the class count
    results = pd.read_csv(path)
    assert len(results) == 3 and results["n_classes"].isna().sum() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefacts.json", "label_efficiency.csv"]  # no temp files
    experiment.write_summary(tmp_path)
    md = (tmp_path / "label_efficiency.md").read_text().splitlines()
    assert "⚠ 1/5 classes" in md[2] and "⚠" not in md[3]
    assert "0.250 ± 0.071" in md[2]  # two seeds: mean ± std
    assert "0.600 / 0.600 (1 seed)" in md[3] and "±" not in md[3]  # one: no fake 0 spread
    assert md[-1].startswith("⚠ k/N classes")
    experiment.write_summary(tmp_path)  # derived files are redrawn, not refused


@pytest.mark.slow
def test_label_efficiency_end_to_end(tiny_run: Path, wbc_small: Path, tmp_path: Path) -> None:
    """Real training and evaluation of every cell (scratch and pretrained fine-tune, one seed)."""
    over = {"train.epochs": 4, "data.batch_size": 16, "optim.warmup_epochs": 0, "optim.lr": 1e-3,
            "model.drop_path": 0.0}
    out = experiment.run_label_efficiency(wbc_small, tmp_path / "exp", {"pre": str(tiny_run)}, (1.0,), 1, over,
                                          linear_probe=False, log=lambda _: None)
    results = pd.read_csv(out / "label_efficiency.csv")
    assert set(results["init"]) == {"scratch", "pre"}
    # 5 easy synthetic classes: chance is 0.2; the pretrained init starts from a trained network
    assert (results["balanced_accuracy"] > 0.4).all(), results
    for row in results.itertuples():
        assert "resnet10t" in Path(row.run, "config.yaml").read_text()
        cell = json.loads(next(Path(row.run).glob("eval*/metrics.json")).read_text())
        assert row.balanced_accuracy == pytest.approx(cell["balanced_accuracy"], rel=1e-12)
