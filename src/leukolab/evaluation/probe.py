"""How good is an embedding? Weighted kNN and a linear probe, cross-validated.

* :func:`knn_predict` - DINO's weighted k-nearest-neighbour classifier
  (``eval_knn.py`` of facebookresearch/dino): L2-normalised features, cosine
  similarity, the top-k training neighbours vote for their class with weight
  ``exp(similarity / T)``.
* :func:`linear_probe_fit` / :func:`linear_probe_fit_predict` - a
  ``StandardScaler -> LogisticRegression`` pipeline whose ``C`` is chosen by a
  stratified grid search *inside the training data only*; the test rows never
  touch scaling or the choice of ``C``.
* :func:`cross_validate_probes` - stratified k-fold cross-validation of both
  (one row per method and fold), :func:`evaluate_fixed_split` - the same on a
  given train/test split; :func:`write_probe_tables` writes the results and
  their ``"mean (± std)"`` summary (:func:`leukolab.evaluation.tables.percent_table`)
  as CSV tables listed in the folder's artefact manifest.

Every score comes from :func:`leukolab.evaluation.metrics.classification_metrics`,
the same function that scores ``evaluate``, so a probe and a trained classifier
making the same predictions get the same numbers.

Labels are class-name strings in a :class:`~leukolab.evaluation.features.FeatureSet`;
the array-level functions take integer class codes ``0 .. C-1``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from leukolab.errors import LeukolabError
from leukolab.evaluation.features import FeatureSet
from leukolab.evaluation.metrics import METRICS, classification_metrics, headline
from leukolab.evaluation.tables import percent_table, to_markdown, write_table

__all__ = [
    "DEFAULT_CS",
    "METRICS",
    "cross_validate_probes",
    "evaluate_fixed_split",
    "knn_predict",
    "linear_probe_fit",
    "linear_probe_fit_predict",
    "probe_metrics",
    "summarise",
    "to_markdown",
    "write_probe_tables",
]

#: inverse regularisation strengths searched by the linear probe
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
LINEAR_PROBE = "linear probe"


# --------------------------------------------------------------------------- checks


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise LeukolabError(f"{name} must be a 2-D (N, D) array, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise LeukolabError(f"{name} must be numeric, got dtype {arr.dtype}")
    _check_finite(arr, name)
    return arr


def _check_finite(x: np.ndarray, name: str, paths: Sequence[str] | None = None) -> None:
    finite = np.isfinite(x)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    first = int(bad_rows[0])
    where = f"row {first}" + (f" ({paths[first]})" if paths is not None else "")
    raise LeukolabError(
        f"{name} contain {int((~finite).sum())} NaN/inf values in {bad_rows.size} rows, first at {where}; "
        "re-extract the features or drop those rows"
    )


def _as_codes(y: np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise LeukolabError(f"{name} must be a 1-D array of {n} class codes, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LeukolabError(f"{name} must hold integer class codes 0..C-1, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise LeukolabError(f"{name} must hold class codes >= 0, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _require_labels(fs: FeatureSet, name: str) -> list[str]:
    if fs.labels is None:
        raise LeukolabError(
            f"{name} features have no labels; the kNN and linear probes need labelled features "
            "(extract them from a labelled data set)"
        )
    if len(fs) == 0:
        raise LeukolabError(f"{name} features are empty (0 rows)")
    _check_finite(fs.features, f"{name} features", fs.paths)
    return fs.labels


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise LeukolabError(f"k must be a positive integer, got {k!r}")
        out.append(int(k))
    if len(set(out)) != len(out):
        raise LeukolabError(f"ks must be distinct, got {list(ks)}")
    return out


# ----------------------------------------------------------------------------- kNN


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both with the mean and std of ``train_x`` only (a few large dimensions then no
    longer dominate the cosine similarity, which matters for MAE features)."""
    mean = train_x.mean(axis=0, keepdims=True)
    std = np.maximum(train_x.std(axis=0, keepdims=True), 1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int,
    temperature: float = 0.07,
    n_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """DINO's weighted kNN: class probabilities ``(N_test, n_classes)``.

    Features are L2-normalised; for each test row the ``k`` training rows of
    highest cosine similarity ``s`` vote for their class with weight
    ``exp(s / temperature)``; the votes summed per class are divided by their
    total, so every row sums to 1 (the arg-max is DINO's prediction). ``k`` larger
    than the training set is clipped to its size. Test rows are processed in
    batches of ``batch_size`` so memory stays at ``batch_size x N_train`` floats.

    Args:
        train_x: ``(N_train, D)`` training features.
        train_y: ``(N_train,)`` integer class codes ``0 .. n_classes-1``.
        test_x: ``(N_test, D)`` features to classify.
        k: number of neighbours.
        temperature: softmax-like temperature T of the vote weights (DINO: 0.07).
        n_classes: number of classes C; defaults to ``max(train_y) + 1``.
        batch_size: test rows per similarity block.
    """
    train_x = _as_matrix(train_x, "train features")
    test_x = _as_matrix(test_x, "test features")
    train_y = _as_codes(train_y, train_x.shape[0], "train labels")
    if train_x.shape[0] == 0:
        raise LeukolabError("kNN needs at least one training row, got 0")
    if train_x.shape[1] != test_x.shape[1]:
        raise LeukolabError(
            f"train and test features differ in dimension ({train_x.shape[1]} vs {test_x.shape[1]})"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise LeukolabError(f"k must be a positive integer, got {k!r}")
    if not temperature > 0 or not np.isfinite(temperature):
        raise LeukolabError(f"kNN temperature must be a positive number, got {temperature!r}")
    if n_classes is None:
        n_classes = int(train_y.max()) + 1
    if train_y.max() >= n_classes:
        raise LeukolabError(f"train labels hold class code {int(train_y.max())} but n_classes={n_classes}")
    k = min(int(k), train_x.shape[0])
    batch_size = max(1, int(batch_size))

    train_n = _l2_normalise(train_x)
    test_n = _l2_normalise(test_x)
    n_test = test_n.shape[0]
    probs = np.zeros((n_test, n_classes), dtype=np.float64)
    rows = np.arange(min(batch_size, n_test))[:, None]
    for start in range(0, n_test, batch_size):
        sim = test_n[start : start + batch_size] @ train_n.T  # (b, N_train) cosine similarities
        b = sim.shape[0]
        if k < sim.shape[1]:
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(sim.shape[1]), (b, k))
        top_sim = sim[rows[:b], top].astype(np.float64)
        # exp(s/T) relative to the row's best neighbour: same ratios, no overflow for tiny T
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)
        votes = np.zeros((b, n_classes), dtype=np.float64)
        np.add.at(votes, (np.repeat(np.arange(b), k), train_y[top].ravel()), weights.ravel())
        probs[start : start + b] = votes / votes.sum(axis=1, keepdims=True)
    return probs


# ---------------------------------------------------------------------- linear probe


def linear_probe_fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 3,
    max_iter: int = 1000,
    scoring: str = "balanced_accuracy",
    n_jobs: int | None = None,
) -> Pipeline:
    """Fit ``StandardScaler -> LogisticRegression`` with ``C`` chosen on ``train_x`` alone.

    ``C`` is picked from ``Cs`` by ``GridSearchCV`` over a stratified
    ``inner_folds``-fold split of the training rows (scaler refitted inside every
    inner fold), scored by ``scoring``; the winner is refitted on all training
    rows. When the rarest training class has fewer than 2 rows no inner split
    is possible and ``C=1.0`` is used. Returns the fitted pipeline.
    """
    train_x = _as_matrix(train_x, "train features")
    train_y = _as_codes(train_y, train_x.shape[0], "train labels")
    Cs = [float(c) for c in Cs]
    if not Cs or any(not (c > 0 and np.isfinite(c)) for c in Cs):
        raise LeukolabError(f"linear probe Cs must be positive numbers, got {Cs}")
    present, counts = np.unique(train_y, return_counts=True)
    if present.size < 2:
        raise LeukolabError(
            f"the linear probe needs at least 2 classes in the training data, got {present.size}"
        )
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("clf", LogisticRegression(C=1.0, max_iter=max_iter, random_state=seed)),
        ]
    )
    n_inner = min(int(inner_folds), int(counts.min()))
    # scipy's L-BFGS-B calls BLAS on tiny vectors, where multi-threaded OpenBLAS is
    # 3-10x slower than one thread (measured: 5-fold CV of N=7000, D=384 takes 10 s
    # instead of 28 s on 2 cores); parallelism, if wanted, comes from n_jobs.
    with threadpool_limits(limits=1, user_api="blas"):
        if n_inner < 2 or len(Cs) == 1:
            if len(Cs) == 1:
                pipe.set_params(clf__C=Cs[0])
            return pipe.fit(train_x, train_y)
        search = GridSearchCV(
            pipe,
            {"clf__C": Cs},
            scoring=scoring,
            cv=StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=seed),
            refit=True,
            n_jobs=n_jobs,
        )
        search.fit(train_x, train_y)
    return search.best_estimator_


def _predict_proba(model: Pipeline, test_x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities ``(N, n_classes)``; classes unseen in training get 0."""
    test_x = _as_matrix(test_x, "test features")
    probs = np.zeros((test_x.shape[0], n_classes), dtype=np.float64)
    probs[:, model.classes_] = model.predict_proba(test_x)
    return probs


def linear_probe_fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    n_classes: int | None = None,
    **kwargs,
) -> np.ndarray:
    """Fit the linear probe on the training rows, return test probabilities ``(N_test, C)``.

    See :func:`linear_probe_fit` for the model and the extra keyword arguments.
    """
    model = linear_probe_fit(train_x, train_y, seed=seed, Cs=Cs, **kwargs)
    if n_classes is None:
        n_classes = int(np.max(train_y)) + 1
    return _predict_proba(model, test_x, n_classes)


# --------------------------------------------------------------------------- metrics


def probe_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """The :data:`~leukolab.evaluation.metrics.METRICS` of predicted class codes ``0 .. n_classes-1``.

    A thin view of :func:`~leukolab.evaluation.metrics.classification_metrics`:
    macro scores average over the classes present in ``y_true``.
    """
    return headline(classification_metrics(y_true, y_pred, [str(c) for c in range(n_classes)]))


# ---------------------------------------------------------------------- evaluation


def _knn_name(k: int) -> str:
    return f"{k}-NN"


def _run_probes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    ks: list[int],
    seed: int,
    fold: int,
    temperature: float,
    Cs: Sequence[float],
    n_jobs: int | None = None,
    knn_standardise: bool = False,
) -> list[dict]:
    """All probes on one train/test split: one results row per method."""
    rows = []
    knn_train, knn_test = (standardise(train_x, test_x) if knn_standardise else (train_x, test_x))
    base = {"fold": fold, "n_train": int(train_x.shape[0]), "n_test": int(test_x.shape[0])}
    for k in ks:
        t0 = time.perf_counter()
        probs = knn_predict(knn_train, train_y, knn_test, k, temperature=temperature, n_classes=n_classes)
        metrics = probe_metrics(test_y, probs.argmax(axis=1), n_classes)
        rows.append(
            {
                "method": _knn_name(k),
                **base,
                **metrics,
                "k": min(k, train_x.shape[0]),
                "C": np.nan,
                "seconds": time.perf_counter() - t0,
            }
        )
    t0 = time.perf_counter()
    model = linear_probe_fit(train_x, train_y, seed=seed, Cs=Cs, n_jobs=n_jobs)
    probs = _predict_proba(model, test_x, n_classes)
    metrics = probe_metrics(test_y, probs.argmax(axis=1), n_classes)
    rows.append(
        {
            "method": LINEAR_PROBE,
            **base,
            **metrics,
            "k": np.nan,
            "C": float(model.named_steps["clf"].C),
            "seconds": time.perf_counter() - t0,
        }
    )
    return rows


def _results_frame(rows: list[dict]) -> pd.DataFrame:
    columns = ["method", "fold", *METRICS, "k", "C", "n_train", "n_test", "seconds"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def _progress_line(rows: list[dict], prefix: str) -> str:
    parts = [f"{r['method']} {100 * r['balanced_accuracy']:.1f}" for r in rows]
    secs = sum(r["seconds"] for r in rows)
    return f"[probe] {prefix}: balanced accuracy % " + ", ".join(parts) + f" ({secs:.1f}s)"


def cross_validate_probes(
    fs: FeatureSet,
    folds: int = 5,
    seed: int = 0,
    ks: Sequence[int] = (1, 20),
    progress: bool = True,
    temperature: float = 0.07,
    Cs: Sequence[float] = DEFAULT_CS,
    n_jobs: int | None = None,
    knn_standardise: bool = False,
) -> pd.DataFrame:
    """Stratified ``folds``-fold cross-validation of the kNN probes and the linear probe.

    Folds come from ``StratifiedKFold(folds, shuffle=True, random_state=seed)``;
    in each, every probe is fitted on the other folds only and scored on the
    held-out one. Returns one row per (method, fold) with the columns
    ``method`` (``"1-NN"``, ``"20-NN"``, ..., ``"linear probe"``), ``fold``
    (0-based), the :data:`METRICS` (fractions), ``k`` (after clipping to the
    training size), ``C`` (the linear probe's chosen C), ``n_train``,
    ``n_test`` and ``seconds``. ``progress`` prints one line per fold to stderr.
    ``temperature`` is the kNN vote temperature, ``Cs`` the linear probe's grid
    and ``n_jobs`` the processes of its grid search (``None``: sequential).

    Raises :class:`LeukolabError` for unlabelled or non-finite features,
    ``folds < 2``, fewer than 2 classes, or a class with fewer rows than folds.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise LeukolabError(f"folds must be an integer >= 2, got {folds!r}")
    folds = int(folds)
    labels = _require_labels(fs, "the")
    ks = _check_ks(ks)
    classes, y = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    if classes.size < 2:
        raise LeukolabError(f"probing needs at least 2 classes, the features have only {classes.tolist()}")
    counts = np.bincount(y, minlength=classes.size)
    rare = int(np.argmin(counts))
    if counts[rare] < folds:
        raise LeukolabError(
            f"class {str(classes[rare])!r} has only {int(counts[rare])} samples, fewer than folds={folds}; "
            "lower --folds or drop that class"
        )
    x = fs.features
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    rows: list[dict] = []
    for fold, (train_idx, test_idx) in enumerate(splitter.split(x, y)):
        fold_rows = _run_probes(
            x[train_idx],
            y[train_idx],
            x[test_idx],
            y[test_idx],
            classes.size,
            ks,
            seed,
            fold,
            temperature,
            Cs,
            n_jobs,
            knn_standardise,
        )
        rows.extend(fold_rows)
        if progress:
            print(_progress_line(fold_rows, f"fold {fold + 1}/{folds}"), file=sys.stderr, flush=True)
    return _results_frame(rows)


def evaluate_fixed_split(
    train: FeatureSet,
    test: FeatureSet,
    seed: int = 0,
    ks: Sequence[int] = (1, 20),
    progress: bool = False,
    temperature: float = 0.07,
    Cs: Sequence[float] = DEFAULT_CS,
    n_jobs: int | None = None,
    knn_standardise: bool = False,
) -> pd.DataFrame:
    """The probes fitted on ``train`` and scored on ``test``; same columns as
    :func:`cross_validate_probes`, with ``fold`` 0.

    Raises :class:`LeukolabError` for unlabelled or non-finite features,
    differing feature dimensions, fewer than 2 training classes, or a test
    label that the training set does not have.
    """
    train_labels = _require_labels(train, "train")
    test_labels = _require_labels(test, "test")
    ks = _check_ks(ks)
    if train.dim != test.dim:
        raise LeukolabError(f"train features have dimension {train.dim} but test features {test.dim}")
    classes, y_train = np.unique(np.asarray(train_labels, dtype=str), return_inverse=True)
    if classes.size < 2:
        raise LeukolabError(
            f"probing needs at least 2 classes, the train features have only {classes.tolist()}"
        )
    unseen = sorted(set(test_labels) - set(classes.tolist()))
    if unseen:
        raise LeukolabError(
            f"test label {unseen[0]!r} does not occur in the train features"
            + (
                f" (nor {len(unseen) - 1} more: {', '.join(map(repr, unseen[1:4]))})"
                if len(unseen) > 1
                else ""
            )
        )
    index = {c: i for i, c in enumerate(classes.tolist())}
    y_test = np.asarray([index[label] for label in test_labels], dtype=np.int64)
    rows = _run_probes(
        train.features, y_train, test.features, y_test, classes.size, ks, seed, 0, temperature, Cs, n_jobs,
        knn_standardise,
    )
    if progress:
        print(_progress_line(rows, "fixed split"), file=sys.stderr, flush=True)
    return _results_frame(rows)


# ------------------------------------------------------------------------- reports

#: the probe results table in percent, one row per method (see :func:`~leukolab.evaluation.tables.percent_table`)
summarise = percent_table


def write_probe_tables(results: pd.DataFrame, folder: Path | str) -> str:
    """Write ``probe.csv`` (one row per method and fold) and ``probe_summary.csv`` (mean ± std over
    folds per method, in percent) into ``folder``, both listed in its artefact manifest; returns the
    summary as a markdown table. Existing files are never overwritten."""
    folder = Path(folder)
    table = percent_table(results)
    n_folds = results["fold"].nunique() if "fold" in results else 1
    write_table(results, folder / "probe.csv", "probe results, one row per method and fold")
    spread = f"mean (± std over {n_folds} folds)" if n_folds > 1 else "one split"
    write_table(table, folder / "probe_summary.csv", f"probes: metrics in percent, {spread}", index=True)
    return to_markdown(table)
