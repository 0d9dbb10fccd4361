"""MIL end to end on a tiny synthetic cohort: cached vs on-the-fly embeddings, train / CV / evaluate / predict,
the CLI and its one-line errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from leukolab.cli.main import main
from leukolab.config import load_defaults
from leukolab.data.mil import read_cohort
from leukolab.data.synthetic.patients import PatientOptions, make_patients
from leukolab.models.mil import build_aggregator
from leukolab.objectives.mil import MILObjective
from leukolab.pipelines.mil import BagData, dataset, predict, train_mil
from leukolab.pipelines.mil_encoder import embed_cohort, load_encoder

# 12 patients (6 / 6), 3-5 cells of 32 px: seconds to write, embed and train
TINY = PatientOptions(n_patients=12, cells_min=3, cells_max=5, size=32, seed=1, tumoral_fraction=0.5)
FAST = {"encoder.model": "resnet10t", "encoder.img_size": 32, "train.epochs": 2, "train.progress": False,
        "data.batch_size": 4, "data.passes_per_epoch": 1, "model.hidden": 16, "model.aggregator": "abmil"}


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patients(tmp_path_factory.mktemp("mil") / "bags", TINY, progress=False)


@pytest.fixture(scope="module")
def trained(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_mil(tmp_path_factory.mktemp("runs"), overrides={"data.bags": str(bags), **FAST})


@pytest.mark.slow
def test_cached_embeddings_predict_like_the_on_the_fly_encoder(bags: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_defaults("mil")
    cohort = read_cohort(bags)
    encoder = load_encoder("resnet10t", 32, seed=0)
    feats = embed_cohort(cohort, encoder, tmp_path / "cache", batch_size=7, progress=False)
    assert [len(f) for f in feats] == [len(p.cells) for p in cohort.patients]
    again = embed_cohort(cohort, encoder, tmp_path / "cache", progress=False)  # read back from the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(feats, again, strict=True))
    data = BagData.of(cohort, feats, ("age", "lymph_count"))
    every = np.arange(len(cohort))
    agg = build_aggregator("abmil", encoder.dim, 2, hidden=16)
    agg.set_normalisation(torch.cat(feats), torch.from_numpy(data.clinical))
    cached = predict(MILObjective(agg), dataset(data, every, cfg, train=False), cfg, torch.device("cpu"))
    on_the_fly = predict(MILObjective(agg, encoder.model), dataset(data, every, cfg, train=False, encoder=encoder),
                         cfg, torch.device("cpu"))
    assert np.allclose(cached.probability, on_the_fly.probability, atol=1e-5)
    for a, b in zip(cached.attention, on_the_fly.attention, strict=True):
        assert np.allclose(a, b, atol=1e-5) and a.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_train_writes_a_run_that_evaluate_and_predict_take(trained: Path, bags: Path, tmp_path: Path) -> None:
    for name in ("config.yaml", "history.csv", "curves.png", "best.pt", "last.pt", "patients.csv",
                 "val_metrics.json", "val_predictions.csv"):
        assert (trained / name).is_file(), name
    patients = pd.read_csv(trained / "patients.csv")
    assert set(patients["part"]) == {"train", "val"} and len(patients) == 12
    assert len(pd.read_csv(trained / "history.csv")) == 2

    assert main(["mil", "evaluate", str(trained), "--data", str(bags), "--no-progress", "--gallery", "2"]) == 0
    out = trained / f"eval-{bags.name}"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("balanced_accuracy", "accuracy", "roc_auc", "macro_f1", "confusion_matrix"):
        assert key in metrics
    assert np.asarray(metrics["confusion_matrix"]).sum() == 12
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:4]) == ["patient", "label", "predicted", "probability"]
    assert ((pred["probability"] >= 0.5).astype(int) == pred["predicted"]).all()
    att = pd.read_csv(out / "attention.csv")
    assert np.allclose(att.groupby("patient")["weight"].sum(), 1.0, atol=1e-5)
    assert (att["weight"] >= 0).all() and len(att) == sum(len(p.cells) for p in read_cohort(bags).patients)
    assert len(list((out / "attention").glob("*.png"))) == 12
    html = (out / "report.html").read_text()
    assert "P0: label" in html and "attention" in html

    # unlabelled patients: LABEL column absent
    rows = list(csv.DictReader(open(bags / "clinical_annotation.csv", encoding="utf-8")))
    unlabelled = tmp_path / "clinical.csv"
    with open(unlabelled, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(("ID", "GENDER", "DOB", "LYMPH_COUNT"))
        w.writerows((r["ID"], r["GENDER"], r["DOB"], r["LYMPH_COUNT"]) for r in rows)
    assert main(["mil", "predict", str(trained), "--data", str(bags), "--clinical", str(unlabelled),
                 "--no-progress", "--out", str(tmp_path / "pred")]) == 0
    unknown = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert unknown["label"].isna().all() and np.allclose(unknown["probability"], pred["probability"], atol=1e-6)


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_more(trained: Path) -> None:
    before = (trained / "history.csv").read_text()
    assert train_mil(None, resume=trained) == trained
    assert (trained / "history.csv").read_text() == before


@pytest.mark.slow
def test_cross_validation_keeps_patients_apart(bags: Path, tmp_path: Path) -> None:
    run = train_mil(tmp_path, overrides={"data.bags": str(bags), **FAST, "train.epochs": 1, "cv.folds": 2,
                                         "cv.compare": ["mean", "moe"]})
    table = pd.read_csv(run / "cv_table.csv")
    assert set(table["method"]) == {"mean (image)", "mean + clinical", "moe + clinical",
                                    "clinical only (logistic regression)"}
    oof = pd.read_csv(run / "cv_predictions.csv")
    for _, part in oof.groupby("method"):
        assert sorted(part["patient"]) == sorted(read_cohort(bags).ids)  # each patient predicted once, in one fold
    folds = pd.read_csv(run / "cv_folds.csv")
    assert len(folds) == 4 * 2 and (folds["n"] == 6).all()
    assert (run / "cv" / "moe-clinical" / "r0-f1" / "predictions.csv").is_file()


@pytest.mark.slow
def test_finetuned_encoder_travels_with_the_run(bags: Path, tmp_path: Path) -> None:
    run = train_mil(tmp_path, overrides={"data.bags": str(bags), **FAST, "train.epochs": 1, "encoder.finetune": True,
                                         "encoder.cells_per_bag": 2})
    state = torch.load(run / "best.pt", weights_only=True)
    frozen = load_encoder("resnet10t", 32, seed=0).model.state_dict()
    assert state["backbone_spec"]["name"] == "resnet10t"
    assert any(not torch.equal(v, frozen[k]) for k, v in state["backbone"].items() if v.is_floating_point())
    assert main(["mil", "evaluate", str(run), "--data", str(bags), "--no-progress", "--gallery", "1"]) == 0


# ---------------------------------------------------------------------------------------------- bad input
def _copy(bags: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bags"
    shutil.copytree(bags, root)
    return root


def _edit_clinical(root: Path, patient: str, column: str, value: str) -> None:
    path = root / "clinical_annotation.csv"
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    for r in rows:
        if r["ID"] == patient:
            r[column] = value
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize(
    ("edit", "extra", "message"),
    [
        ("extra_folder", [], "patient folder .*P77 has no row in the clinical table"),
        ("missing_folder", [], "clinical row of patient P2 has no folder"),
        ("empty_bag", [], "patient P2: the bag .* holds no images"),
        ("dob", [], r"patient P3\) DOB: cannot read the date '31/31/1950'"),
        ("count", [], r"patient P3\): LYMPH_COUNT 'n/a' is not a positive number"),
        ("label", [], r"patient P3\): LABEL '3' is not 0"),
        (None, ["--folds", "7"], r"7-fold cross-validation: only \d+ .* patient\(s\) .*; need at least 7 per class"),
        (None, ["--encoder", "vit_tiny_patch16_224", "--img-size", "40"], "not a multiple of .*patch size 16"),
        (None, ["--encoder", "no_such_net"], "unknown backbone 'no_such_net'"),
        (None, ["--aggregator", "moe", "--clinical-features", "none"], "aggregator 'moe' needs clinical features"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    bags: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str | None, extra: list[str], message: str
) -> None:
    root = _copy(bags, tmp_path)
    if edit == "extra_folder":
        shutil.copytree(root / "P0", root / "P77")
    elif edit == "missing_folder":
        shutil.rmtree(root / "P2")
    elif edit == "empty_bag":
        for f in (root / "P2").iterdir():
            f.unlink()
    elif edit == "dob":
        _edit_clinical(root, "P3", "DOB", "31/31/1950")
    elif edit == "count":
        _edit_clinical(root, "P3", "LYMPH_COUNT", "n/a")
    elif edit == "label":
        _edit_clinical(root, "P3", "LABEL", "3")
    args = ["mil", "train", str(root), "--encoder", "resnet10t", "--img-size", "32", "--out", str(tmp_path / "runs"),
            "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("mil-*"))  # nothing left behind


def test_synth_patients_cli(tmp_path: Path) -> None:
    assert main(["synth", "patients", str(tmp_path / "p"), "--n-patients", "3", "--cells-min", "2", "--cells-max",
                 "2", "--size", "24", "--seed", "5", "--no-progress"]) == 0
    assert len(read_cohort(tmp_path / "p")) == 3
    assert main(["synth", "patients", str(tmp_path / "p"), "--n-patients", "3"]) == 2  # never overwritten
