"""Embedding evaluation: features files, weighted kNN, linear probe, cross-validation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from leukolab.errors import LeukolabError
from leukolab.evaluation import probe
from leukolab.evaluation.features import FeatureSet, load_features, save_features
from leukolab.evaluation.manifest import read_manifest
from leukolab.evaluation.probe import (
    METRICS,
    cross_validate_probes,
    evaluate_fixed_split,
    knn_predict,
    linear_probe_fit_predict,
    probe_metrics,
    summarise,
    to_markdown,
    write_probe_tables,
)

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def make_features(
    n_per_class: int = 40, dim: int = 16, separation: float = 10.0, seed: int = 0, random_labels: bool = False
) -> FeatureSet:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    centres = rng.normal(size=(len(CLASSES), dim)) * separation
    x = centres[y] + rng.normal(size=(y.size, dim))
    if random_labels:
        x = rng.normal(size=(y.size, dim))
        y = rng.permutation(y)
    return FeatureSet(
        features=x.astype(np.float32),
        paths=[f"cells/{i:04d}.png" for i in range(y.size)],
        labels=[CLASSES[c] for c in y],
        extra=pd.DataFrame(
            {"source": np.where(np.arange(y.size) % 2, "pbc", "raabin"), "idx": np.arange(y.size)}
        ),
    )


# ------------------------------------------------------------------ cross-validation


def test_separable_clusters_are_probed_perfectly() -> None:
    results = cross_validate_probes(make_features(), folds=5, seed=0, progress=False)
    assert list(dict.fromkeys(results["method"])) == ["1-NN", "20-NN", "linear probe"]
    assert len(results) == 15 and sorted(results["fold"].unique()) == [0, 1, 2, 3, 4]
    mean = results.groupby("method")["balanced_accuracy"].mean()
    assert (mean >= 0.98).all(), mean
    assert (results["n_train"] + results["n_test"] == 200).all()


def test_random_labels_stay_near_chance() -> None:
    fs = make_features(random_labels=True, seed=1)
    results = cross_validate_probes(fs, folds=5, seed=0, progress=False)
    mean = results.groupby("method")["balanced_accuracy"].mean()
    assert (mean < 0.4).all(), mean


def test_cross_validation_is_reproducible_and_reports_progress(capsys: pytest.CaptureFixture[str]) -> None:
    fs = make_features(n_per_class=12)
    a = cross_validate_probes(fs, folds=3, seed=3, ks=(1, 5), Cs=(0.1, 1.0))
    b = cross_validate_probes(fs, folds=3, seed=3, ks=(1, 5), progress=False, Cs=(0.1, 1.0))
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    err = capsys.readouterr().err
    assert err.count("[probe] fold") == 3 and "5-NN" in err


def test_test_fold_never_touches_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = make_features(n_per_class=20, seed=2)
    row_of = {row.tobytes(): i for i, row in enumerate(fs.features)}
    assert len(row_of) == len(fs)  # rows are unique, so they identify samples

    def ids(x: np.ndarray) -> set[int]:
        return {row_of[r.tobytes()] for r in np.asarray(x, dtype=np.float32)}

    knn_calls: list[tuple[set[int], set[int]]] = []
    real_knn = probe.knn_predict

    def spy_knn(train_x, train_y, test_x, *args, **kwargs):
        knn_calls.append((ids(train_x), ids(test_x)))
        return real_knn(train_x, train_y, test_x, *args, **kwargs)

    linear_calls: list[tuple[np.ndarray, object]] = []
    real_fit = probe.linear_probe_fit

    def spy_fit(train_x, train_y, *args, **kwargs):
        model = real_fit(train_x, train_y, *args, **kwargs)
        linear_calls.append((np.array(train_x, copy=True), model))
        return model

    # every StandardScaler fit - the inner C-selection folds and the final refit
    scaler_rows: list[set[int]] = []
    real_scaler_fit = StandardScaler.fit

    def spy_scaler_fit(self, X, y=None, sample_weight=None):
        scaler_rows.append(ids(X))
        return real_scaler_fit(self, X, y, sample_weight=sample_weight)

    predicted: list[set[int]] = []
    real_predict = probe._predict_proba

    def spy_predict(model, test_x, n_classes):
        predicted.append(ids(test_x))
        return real_predict(model, test_x, n_classes)

    monkeypatch.setattr(probe, "knn_predict", spy_knn)
    monkeypatch.setattr(probe, "linear_probe_fit", spy_fit)
    monkeypatch.setattr(probe, "_predict_proba", spy_predict)
    monkeypatch.setattr(StandardScaler, "fit", spy_scaler_fit)

    cross_validate_probes(fs, folds=4, seed=0, ks=(1, 7), progress=False, Cs=(0.1, 1.0))

    everything = set(range(len(fs)))
    assert len(knn_calls) == 8 and len(linear_calls) == 4 and len(predicted) == 4
    test_folds = [test for _, test in knn_calls[::2]]
    assert set().union(*test_folds) == everything and sum(map(len, test_folds)) == len(fs)
    for train, test in knn_calls:
        assert not train & test and train | test == everything
    for fold, (test, (train_x, model)) in enumerate(zip(test_folds, linear_calls, strict=True)):
        train = ids(train_x)
        assert not train & test and train | test == everything
        assert predicted[fold] == test
        # the final scaler is the training fold's: its mean is the training-fold mean
        np.testing.assert_allclose(
            model.named_steps["scaler"].mean_, train_x.mean(axis=0), rtol=1e-5, atol=1e-5
        )
    # grid search refits the scaler per inner fold and per C; none of them ever saw a test row
    assert len(scaler_rows) > 4 * 2
    for rows in scaler_rows:
        assert any(rows <= everything - test for test in test_folds)
        assert not any(rows & test and rows <= everything - test for test in test_folds)
    # and C was chosen inside the training fold: inner fits used strict subsets of it
    inner = [rows for rows in scaler_rows if len(rows) < len(fs) - max(map(len, test_folds))]
    assert inner, "no inner-CV fits seen: C was not selected by cross-validation"


def test_fixed_split() -> None:
    fs = make_features(n_per_class=30, seed=4)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(fs))
    train, test = fs.subset(order[:100]), fs.subset(order[100:])
    results = evaluate_fixed_split(train, test, seed=0)
    assert list(results["method"]) == ["1-NN", "20-NN", "linear probe"]
    assert (results["fold"] == 0).all() and (results["n_test"] == 50).all()
    assert (results["balanced_accuracy"] >= 0.98).all()
    table = summarise(results)
    assert table.loc["linear probe", "accuracy"] == "100.0"  # one fold: no "± std"


def test_k_larger_than_training_set_is_clipped() -> None:
    fs = make_features(n_per_class=4, dim=8)
    results = cross_validate_probes(fs, folds=2, seed=0, ks=(1, 50), progress=False, Cs=(1.0,))
    knn50 = results[results["method"] == "50-NN"]
    assert (knn50["k"] == 10).all()
    probs = knn_predict(fs.features[:3], np.array([0, 1, 2]), fs.features, k=50, n_classes=5)
    assert probs.shape == (len(fs), 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


# ----------------------------------------------------------------------------- kNN


def test_knn_one_neighbour_on_training_data_is_identity() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    y = rng.integers(0, 7, size=300)
    probs = knn_predict(x, y, x, k=1, n_classes=7, batch_size=64)  # several batches
    np.testing.assert_array_equal(probs.argmax(axis=1), y)
    np.testing.assert_allclose(probs.max(axis=1), 1.0)


def test_knn_temperature_lets_a_close_neighbour_outweigh_two_far_ones() -> None:
    def unit(angle_cos: float) -> list[float]:
        return [angle_cos, float(np.sqrt(1 - angle_cos**2))]

    query = np.array([[1.0, 0.0]])
    train_x = np.array([unit(0.9), unit(0.8), unit(0.8)]) * np.array(
        [[1.0], [3.0], [0.5]]
    )  # norms don't matter
    train_y = np.array([0, 1, 1])
    sharp = knn_predict(train_x, train_y, query, k=3, temperature=0.01, n_classes=2)
    flat = knn_predict(train_x, train_y, query, k=3, temperature=100.0, n_classes=2)
    assert sharp.argmax() == 0 and sharp[0, 0] > 0.99
    assert flat.argmax() == 1 and flat[0, 1] == pytest.approx(2 / 3, abs=1e-3)
    # DINO's weights: exp(s / T) summed per class
    w = np.exp(np.array([0.9, 0.8, 0.8]) / 0.07)
    expected = np.array([w[0], w[1] + w[2]]) / w.sum()
    np.testing.assert_allclose(knn_predict(train_x, train_y, query, k=3, n_classes=2)[0], expected, rtol=1e-5)


def test_knn_and_linear_probe_column_per_class() -> None:
    fs = make_features(n_per_class=10, dim=8)
    y = np.unique(np.asarray(fs.labels), return_inverse=True)[1]
    mask = y < 3  # classes 3 and 4 absent from training
    probs = linear_probe_fit_predict(fs.features[mask], y[mask], fs.features, seed=0, n_classes=5)
    assert probs.shape == (len(fs), 5)
    np.testing.assert_array_equal(probs[:, 3:], 0.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


# --------------------------------------------------------------------------- metrics


def test_probe_metrics_and_summary_table() -> None:
    m = probe_metrics(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), n_classes=2)
    assert list(m) == list(METRICS)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"])
    results = pd.DataFrame(
        [{"method": "1-NN", "fold": f, **{k: v for k in METRICS}} for f, v in enumerate([0.86, 0.87, 0.867])]
        + [{"method": "linear probe", "fold": 0, **{k: 0.9 for k in METRICS}}]
        + [{"method": "linear probe", "fold": 1, **{k: 0.9 for k in METRICS}}]
    )
    table = summarise(results)
    assert list(table.index) == ["1-NN", "linear probe"] and list(table.columns) == list(METRICS)
    assert table.loc["1-NN", "accuracy"] == "86.6 (± 0.5)"
    assert table.loc["linear probe", "f1_macro"] == "90.0 (± 0.0)"
    md = to_markdown(table).splitlines()
    assert md[0] == "| method | " + " | ".join(METRICS) + " |"
    assert md[1].startswith("| --- |") and md[1].count("---:") == len(METRICS)
    assert md[2].startswith("| 1-NN | 86.6 (± 0.5) |") and len(md) == 4


def test_probe_tables_are_written_and_listed_in_the_manifest(tmp_path) -> None:
    results = cross_validate_probes(make_features(n_per_class=12), folds=3, ks=(1,), Cs=(1.0,), progress=False)
    md = write_probe_tables(results, tmp_path)
    assert [(a.path, a.kind) for a in read_manifest(tmp_path)] == [("probe.csv", "table"),
                                                                   ("probe_summary.csv", "table")]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "probe.csv"), results, check_dtype=False)
    summary = pd.read_csv(tmp_path / "probe_summary.csv", index_col="method")
    assert summary.loc["linear probe", "accuracy"] == summarise(results).loc["linear probe", "accuracy"]
    assert md.splitlines()[0] == "| method | " + " | ".join(METRICS) + " |"
    with pytest.raises(LeukolabError, match="already exists"):
        write_probe_tables(results, tmp_path)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "suffix",
    [".npz", pytest.param(".parquet", marks=pytest.mark.skipif(not HAS_PYARROW, reason="needs pyarrow"))],
)
def test_features_round_trip(tmp_path, suffix: str) -> None:
    fs = make_features(n_per_class=3, dim=5)
    out = save_features(fs, tmp_path / "sub" / f"feats{suffix}")
    assert out == tmp_path / "sub" / f"feats{suffix}" and out.is_file()
    back = load_features(out)
    assert back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, fs.features)
    assert back.paths == fs.paths and back.labels == fs.labels
    assert list(back.extra.columns) == ["source", "idx"]
    assert back.extra["source"].tolist() == fs.extra["source"].tolist()
    assert back.extra["idx"].tolist() == fs.extra["idx"].tolist()
    with pytest.raises(LeukolabError, match="already exists"):
        save_features(fs, out)
    assert load_features(out).paths == fs.paths  # untouched by the refused write

    unlabelled = FeatureSet(fs.features, fs.paths, labels=None, extra=None)
    back = load_features(save_features(unlabelled, tmp_path / f"unlabelled{suffix}"))
    assert back.labels is None and back.extra is None and back.dim == 5


def test_features_file_errors(tmp_path) -> None:
    fs = make_features(n_per_class=2, dim=3)
    with pytest.raises(LeukolabError, match=r"\.csv"):
        save_features(fs, tmp_path / "feats.csv")
    with pytest.raises(LeukolabError, match="does not exist"):
        load_features(tmp_path / "missing.npz")
    with pytest.raises(LeukolabError, match="txt"):
        load_features(tmp_path / "x.txt")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(LeukolabError, match=r"garbage\.npz"):
        load_features(garbage)
    no_paths = tmp_path / "no_paths.npz"
    np.savez_compressed(no_paths, features=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(LeukolabError, match="'paths'"):
        load_features(no_paths)
    short = tmp_path / "short.npz"
    np.savez_compressed(short, features=np.zeros((2, 3)), paths=np.array(["a.png"]))
    with pytest.raises(LeukolabError, match="'paths'"):
        load_features(short)
    with pytest.raises(LeukolabError, match="3 rows but 2 paths"):
        FeatureSet(np.zeros((3, 2)), ["a", "b"])
    if HAS_PYARROW:
        bad = tmp_path / "bad.parquet"
        bad.write_bytes(b"PAR1 nonsense")
        with pytest.raises(LeukolabError, match=r"bad\.parquet"):
            load_features(bad)
        clash = FeatureSet(fs.features, fs.paths, fs.labels, pd.DataFrame({"f0": range(len(fs))}))
        with pytest.raises(LeukolabError, match="'f0'"):
            save_features(clash, tmp_path / "clash.parquet")


# ---------------------------------------------------------------------------- errors


def test_probe_errors_name_the_culprit() -> None:
    fs = make_features(n_per_class=10, dim=4)
    unlabelled = FeatureSet(fs.features, fs.paths)
    with pytest.raises(LeukolabError, match="no labels"):
        cross_validate_probes(unlabelled, progress=False)
    with pytest.raises(LeukolabError, match="no labels"):
        evaluate_fixed_split(fs, unlabelled)
    with pytest.raises(LeukolabError, match="folds must be an integer >= 2, got 1"):
        cross_validate_probes(fs, folds=1, progress=False)

    labels = list(fs.labels)
    labels[:8] = ["monocyte"] * 8  # basophil keeps only 2 samples
    few = FeatureSet(fs.features, fs.paths, labels)
    with pytest.raises(LeukolabError, match=r"class 'basophil' has only 2 samples, fewer than folds=5"):
        cross_validate_probes(few, folds=5, progress=False)

    feats = fs.features.copy()
    feats[7, 2] = np.nan
    feats[9, 0] = np.inf
    with pytest.raises(LeukolabError, match=r"NaN/inf .* row 7 \(cells/0007.png\)"):
        cross_validate_probes(FeatureSet(feats, fs.paths, fs.labels), progress=False)
    with pytest.raises(LeukolabError, match="NaN/inf"):
        knn_predict(feats, np.zeros(len(fs), dtype=int), fs.features, k=1)
    with pytest.raises(LeukolabError, match="NaN/inf"):
        evaluate_fixed_split(fs, FeatureSet(feats, fs.paths, fs.labels))

    train = fs.subset([i for i, label in enumerate(fs.labels) if label != "eosinophil"])
    with pytest.raises(LeukolabError, match="test label 'eosinophil' does not occur in the train"):
        evaluate_fixed_split(train, fs)
    with pytest.raises(LeukolabError, match="k must be a positive integer, got 0"):
        cross_validate_probes(fs, ks=(0,), progress=False)
    with pytest.raises(LeukolabError, match="temperature"):
        knn_predict(fs.features, np.zeros(len(fs), dtype=int), fs.features, k=1, temperature=0)


def test_knn_standardise_stops_loud_noise_dimensions_from_drowning_the_signal() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    signal = 3 * np.eye(3)[y] + rng.normal(0, 0.2, (180, 3))
    noise = rng.normal(0, 1.0, (180, 20)) * np.linspace(5, 10, 20)  # loud dimensions with no information
    fs = FeatureSet(np.hstack([signal, noise]).astype(np.float32), [f"{i}.png" for i in range(180)],
                    [str(v) for v in y])
    plain = cross_validate_probes(fs, folds=3, seed=0, ks=(5,), progress=False)
    scaled = cross_validate_probes(fs, folds=3, seed=0, ks=(5,), progress=False, knn_standardise=True)
    acc = {name: r[r["method"] == "5-NN"]["balanced_accuracy"].mean() for name, r in (("plain", plain),
                                                                                     ("scaled", scaled))}
    assert acc["plain"] < 0.6 and acc["scaled"] > 0.95
