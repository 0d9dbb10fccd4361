"""The one metrics function, the tables module and the artefact manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from leukolab.errors import LeukolabError
from leukolab.evaluation import probe
from leukolab.evaluation.features import FeatureSet
from leukolab.evaluation.manifest import MANIFEST, Artefact, read_manifest, record
from leukolab.evaluation.metrics import METRICS, classification_metrics, headline, write_metrics
from leukolab.evaluation.plots import plot_curves
from leukolab.evaluation.tables import (
    label_efficiency_summary,
    label_efficiency_table,
    mean_std,
    percent_table,
    to_markdown,
    write_table,
)

NAMES = ["basophil", "eosinophil", "lymphocyte", "monocyte"]


def test_macro_scores_average_over_the_classes_in_y_true_and_match_sklearn() -> None:
    # class 2 (lymphocyte) is absent from y_true but predicted twice
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 3, 3, 3])
    y_pred = np.array([0, 0, 2, 1, 1, 1, 2, 3, 0, 3])
    m = classification_metrics(y_true, y_pred, NAMES)
    present = [0, 1, 3]
    recalls = [2 / 4, 2 / 3, 2 / 3]  # by hand
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn drops the absent class, as we want
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"])
    p, _, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    assert m["f1_macro"] == pytest.approx(f.mean()) and m["precision_macro"] == pytest.approx(p.mean())
    assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="weighted"))
    # scikit-learn's default (the union with the predicted classes) counts lymphocyte's F1 of 0: not ours
    union = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert union == pytest.approx(3 / 4 * m["f1_macro"]) and union < m["f1_macro"]
    assert m["accuracy"] == pytest.approx(0.6) and m["n"] == 10
    assert m["n_classes_present"] == 3 and m["n_predicted_classes"] == 4
    # per-class scores and the confusion matrix cover every class of the model
    assert list(m["per_class"]) == NAMES
    assert m["per_class"]["lymphocyte"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["monocyte"]["precision"] == pytest.approx(1.0)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm[:, 2].tolist() == [1, 1, 0, 0] and cm.sum() == 10
    assert json.loads(json.dumps(m)) == m  # JSON-ready


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(LeukolabError, match="differ in length"):
        classification_metrics([0, 1], [0], NAMES)
    with pytest.raises(LeukolabError, match=r"outside 0\.\.3"):
        classification_metrics([0, 4], [0, 1], NAMES)
    with pytest.raises(LeukolabError, match="no samples"):
        classification_metrics([], [], NAMES)


def test_probe_and_evaluate_give_identical_numbers_on_the_same_predictions(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukolab.pipelines.classify import evaluate_run

    eval_dir = evaluate_run(tiny_run, check_images=False, show_progress=False)
    written = json.loads((eval_dir / "metrics.json").read_text())
    preds = pd.read_csv(eval_dir / "predictions.csv")
    names = written["class_names"]
    # the probe, given the classifier's predictions as its kNN answer, scores them like evaluate
    classes = sorted(names)  # the probe's class codes: sorted label names

    def classifier_as_knn(train_x, train_y, test_x, k, temperature=0.07, n_classes=None, **kw):
        return np.eye(n_classes)[[classes.index(p) for p in preds["predicted"]]]

    monkeypatch.setattr(probe, "knn_predict", classifier_as_knn)
    rng = np.random.default_rng(0)
    train = FeatureSet(rng.normal(size=(2 * len(names), 3)), [f"t{i}" for i in range(2 * len(names))], names * 2)
    test = FeatureSet(rng.normal(size=(len(preds), 3)), preds["path"].tolist(), preds["actual"].tolist())
    rows = probe.evaluate_fixed_split(train, test, ks=(1,), Cs=(1.0,))
    knn_row = rows[rows["method"] == "1-NN"].iloc[0]
    assert {k: knn_row[k] for k in METRICS} == {k: written[k] for k in METRICS}
    codes = {n: i for i, n in enumerate(names)}
    y, pred = preds["actual"].map(codes).to_numpy(), preds["predicted"].map(codes).to_numpy()
    assert probe.probe_metrics(y, pred, len(names)) == headline(written)
    # and evaluate listed what it wrote
    listed = {a.path: a.kind for a in read_manifest(eval_dir)}
    assert listed["metrics.json"] == "metrics" and listed["confusion_matrix.png"] == "figure"


# ----------------------------------------------------------------------------- tables


def test_mean_std_and_percent_table() -> None:
    results = pd.DataFrame({"method": ["a", "a", "b"], "accuracy": [0.8, 0.9, 0.5], "other": [1, 2, 3]})
    stats = mean_std(results, "method", ("accuracy", "missing"))
    assert list(stats.columns) == ["method", "accuracy_mean", "accuracy_std", "n"]
    assert stats["accuracy_mean"].tolist() == pytest.approx([0.85, 0.5])
    assert stats["accuracy_std"].iloc[0] == pytest.approx(np.std([0.8, 0.9], ddof=1)) and stats["n"].tolist() == [2, 1]
    table = percent_table(results, metrics=("accuracy",))
    assert table.loc["a", "accuracy"] == "85.0 (± 7.1)" and table.loc["b", "accuracy"] == "50.0"
    with pytest.raises(LeukolabError, match="lacks the column"):
        percent_table(results, metrics=("f1_macro",))


def test_label_efficiency_table_flags_collapse_and_shows_one_seed_without_spread() -> None:
    rows = [{"init": i, "mode": "finetune", "fraction": f, "seed": s, "balanced_accuracy": b, "f1_macro": b,
             "accuracy": b, "n_predicted_classes": k, "n_classes": 5}
            for i, f, s, b, k in (("scratch", 0.1, 0, 0.2, 1), ("scratch", 0.1, 1, 0.3, 5), ("mae", 0.1, 0, 0.6, 5),
                                  ("mae", 1.0, 0, 0.9, 5))]
    table = label_efficiency_table(label_efficiency_summary(pd.DataFrame(rows)))
    assert list(table.columns) == ["init", "mode", "1 labels: bal. acc / macro F1", "0.1 labels: bal. acc / macro F1"]
    scratch, mae = table.iloc[0], table.iloc[1]
    assert scratch.iloc[2] == "–"  # not run at that fraction
    assert scratch.iloc[3] == "0.250 ± 0.071 / 0.250 ± 0.071 ⚠ 1/5 classes"
    assert mae.iloc[3] == "0.600 / 0.600 (1 seed)"
    md = to_markdown(table, index=False).splitlines()
    assert md[0].startswith("| init | mode |") and md[1] == "| --- | --- | ---: | ---: |"
    assert md[2].startswith("| scratch | finetune | – |")


# --------------------------------------------------------------------------- manifest


def test_record_is_idempotent_and_writers_record_what_they_write(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    write_metrics(classification_metrics([0, 1], [0, 0], NAMES[:2]), out / "metrics.json")
    write_table(pd.DataFrame({"a": [1]}), out / "t.csv", "a table")
    plot_curves(pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5]}), out / "curves.png")
    record(out, "t.csv", "table", "a table")  # again: no duplicate
    record(out, out / "t.csv", "table", "renamed")  # an absolute path inside the folder: updated in place
    assert read_manifest(out) == [Artefact("metrics.json", "metrics", "metrics"), Artefact("t.csv", "table", "renamed"),
                                  Artefact("curves.png", "figure", "training curves")]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "curves.png", "metrics.json", "t.csv"]  # no temp files
    with pytest.raises(LeukolabError, match="already exists"):
        write_metrics({}, out / "metrics.json")
    with pytest.raises(LeukolabError, match="already exists"):
        write_table(pd.DataFrame({"a": [2]}), out / "t.csv", "a table")
    assert pd.read_csv(out / "t.csv")["a"].tolist() == [1]
    with pytest.raises(ValueError, match="kind"):
        record(out, "t.csv", "movie", "x")
    with pytest.raises(ValueError, match="not inside"):
        record(out, tmp_path / "elsewhere.csv", "table", "x")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(LeukolabError, match="not a leukolab artefact manifest"):
        read_manifest(tmp_path)


def test_summary_warns_on_a_collapsed_model_not_on_a_class_the_data_lacks(tmp_path: Path) -> None:
    from leukolab.pipelines.classify import metrics_summary

    names = ["a", "b", "background"]
    y = np.array([0, 0, 1, 1])
    healthy = classification_metrics(y, y, names)  # 'background' never occurs in this data
    collapsed = classification_metrics(y, np.zeros(4, dtype=int), names)
    for name, m in (("healthy", healthy), ("collapsed", collapsed)):
        (tmp_path / f"{name}.json").write_text(json.dumps({k: v for k, v in m.items() if k != "confusion_matrix"}))
    assert "WARNING" not in metrics_summary(tmp_path / "healthy.json")
    assert "predicts only 1 of the 2 classes in the data" in metrics_summary(tmp_path / "collapsed.json")
