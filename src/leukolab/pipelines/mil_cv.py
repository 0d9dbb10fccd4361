"""Cross-validation by patient of the MIL task: every aggregator, with and without clinical data, and the
clinical-only logistic regression, in the same folds.

For each repeat ``r`` (seed ``seed + r``) the patients are split into ``k``
stratified folds (:func:`leukolab.data.mil.patient_folds`). In fold ``f`` each
method trains on the other folds -- a stratified fifth of them held out by
patient to pick the best epoch -- through :meth:`~leukolab.pipelines.lifecycle.Run.fit` (the one
Trainer; no ``curves.png`` per fold), in its own folder
``cv/<method>/r<r>-f<f>/``, and predicts the patients of fold ``f``. A fold
folder with ``predictions.csv`` is done and is skipped when the run is resumed;
one with only ``last.pt`` resumes.

Written into the run folder:

* ``cv_folds.csv`` - one row per (method, repeat, fold): the scores on that fold;
* ``cv_predictions.csv`` - the out-of-fold probability of every patient per method and repeat;
* ``cv_table.csv`` / ``cv_table.md`` - per method, mean ± std over all folds of
  each score, the balanced accuracy of the pooled out-of-fold predictions (mean ±
  std over repeats), and the balanced-accuracy difference to the clinical-only
  model *in the same folds* (mean ± std), best first.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukolab.data.mil import patient_folds, patient_split
from leukolab.evaluation.mil import MIL_METRICS, cv_table, mil_metrics
from leukolab.evaluation.tables import to_markdown, write_table
from leukolab.pipelines.lifecycle import Run
from leukolab.pipelines.mil import BagData, dataset, fit_fold, predict
from leukolab.pipelines.mil_encoder import Encoder
from leukolab.registry import AGGREGATORS
from leukolab.training.loop import TrainerConfig, pick_device
from leukolab.utils.files import write_text
from leukolab.utils.seed import seed_everything

__all__ = ["CLINICAL_LR", "cross_validate", "cv_methods", "fit_clinical_lr"]

#: the clinical-only baseline's name in the tables
CLINICAL_LR = "clinical only (logistic regression)"


def cv_methods(compare: list[str], clinical: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(method, aggregator, clinical features)`` of every compared model: each aggregator on the image
    alone (unless it needs clinical data) and with the clinical features (when there are any)."""
    out = []
    for name in compare:
        factory = AGGREGATORS.get(name)
        if not getattr(factory, "uses_cells", True):
            continue  # the clinical-only baseline is the logistic regression
        if not getattr(factory, "needs_clinical", False):
            out.append((f"{name} (image)", name, ()))
        if clinical:
            out.append((f"{name} + clinical", name, clinical))
    return out


def fit_clinical_lr(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Tumoral probabilities of a class-balanced logistic regression on standardised clinical features."""
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    model.fit(x_train, y_train)
    return model.predict_proba(x_test)[:, 1]


def _slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", method).strip("-")


def _scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    m = mil_metrics(y, prob)
    return {k: float(m[k]) for k in MIL_METRICS}


def cross_validate(run: Run, data: BagData, encoder: Encoder) -> pd.DataFrame:
    """Cross-validate every method of ``run.cfg["cv"]`` (see the module docstring); returns the table."""
    cfg = run.cfg
    assert run.dir is not None
    folds, repeats = int(cfg["cv"]["folds"]), int(cfg["cv"]["repeats"])
    methods = cv_methods(list(cfg["cv"]["compare"]), data.clinical_names)
    trainer_config = replace(TrainerConfig.from_config(cfg), progress=False, keep_last=0)
    device = pick_device(cfg["train"]["device"])
    y = data.labels
    rows, preds = [], []
    for r in range(repeats):
        seed = run.seed + r
        fold = patient_folds(y, folds, seed)
        for f in range(folds):
            test, rest = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            tr, va = patient_split(y[rest], float(cfg["data"]["val_fraction"]), seed)
            tr, va = rest[tr], rest[va]
            results: list[tuple[str, np.ndarray]] = []
            if data.clinical_names:
                results.append((CLINICAL_LR, fit_clinical_lr(data.clinical[rest], y[rest], data.clinical[test])))
            for method, aggregator, features in methods:
                folder = run.dir / "cv" / _slug(method) / f"r{r}-f{f}"
                done = folder / "predictions.csv"
                if done.is_file():
                    results.append((method, pd.read_csv(done)["probability"].to_numpy()))
                    continue
                resumed = (folder / "last.pt").is_file()
                folder.mkdir(parents=True, exist_ok=True)
                seed_everything(seed)
                fold_run = Run("mil", cfg, seed, resumed, name=folder.name, dir=folder)
                objective = fit_fold(fold_run, cfg, data, tr, va, aggregator, features, encoder, trainer_config,
                                     curves=False)
                images = encoder if cfg["encoder"]["finetune"] else None  # a trained encoder embeds anew
                prob = predict(objective, dataset(data, test, cfg, train=False, features=features, encoder=images),
                               cfg, device).probability
                write_table(pd.DataFrame({"patient": [data.cohort.ids[i] for i in test], "label": y[test],
                                          "probability": prob}), done, f"{method}: predictions of fold {f}")
                results.append((method, prob))
            for method, prob in results:
                rows.append({"method": method, "repeat": r, "fold": f, "n": len(test), **_scores(y[test], prob)})
                preds += [{"method": method, "repeat": r, "fold": f, "patient": data.cohort.ids[i], "label": int(y[i]),
                           "probability": float(p)} for i, p in zip(test, prob, strict=True)]
    per_fold, oof = pd.DataFrame(rows), pd.DataFrame(preds)
    table = summarise(per_fold, oof)
    write_table(per_fold, run.dir / "cv_folds.csv", "cross-validation: scores per method, repeat and fold",
                overwrite=True)
    write_table(oof, run.dir / "cv_predictions.csv", "cross-validation: out-of-fold predictions", overwrite=True)
    write_table(table, run.dir / "cv_table.csv", f"{folds}-fold cross-validation by patient x {repeats} repeat(s)",
                overwrite=True)
    write_text(run.dir / "cv_table.md", to_markdown(table, index=False), overwrite=True)
    return table


def summarise(per_fold: pd.DataFrame, oof: pd.DataFrame) -> pd.DataFrame:
    """The comparison table of :func:`cross_validate` from its per-fold scores and out-of-fold predictions."""
    table = cv_table(per_fold)
    pooled = {}
    for method, part in oof.groupby("method", sort=False):
        ba = [mil_metrics(g["label"].to_numpy(), g["probability"].to_numpy())["balanced_accuracy"]
              for _, g in part.groupby("repeat")]
        pooled[method] = f"{np.mean(ba):.3f} ± {np.std(ba, ddof=1):.3f}" if len(ba) > 1 else f"{ba[0]:.3f}"
    table.insert(2, "pooled_balanced_accuracy", table["method"].map(pooled))
    if CLINICAL_LR in set(per_fold["method"]):
        base = per_fold[per_fold["method"] == CLINICAL_LR].set_index(["repeat", "fold"])["balanced_accuracy"]
        delta = {}
        for method, part in per_fold.groupby("method", sort=False):
            d = part.set_index(["repeat", "fold"])["balanced_accuracy"] - base
            delta[method] = f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}" if len(d) > 1 else f"{d.mean():+.3f}"
        table.insert(3, "delta_balanced_accuracy_vs_clinical", table["method"].map(delta))
    return table
