"""The ``ensemble fit`` recipe: a weighted ensemble of trained classifier runs, fitted on validation data.

Every member predicts the validation images (each with its own input size and
preprocessing, optionally with dihedral TTA); one weight per member is fitted
(:func:`leukolab.evaluation.ensemble_weights.fit_weights`), and a new ensemble
folder is written:

* ``ensemble.yaml`` -- ``members`` (absolute run paths), ``weights``,
  ``class_names``, ``objective``, ``data`` and ``tta``: what
  :func:`leukolab.pipelines.predictors.load_predictor` reads, so ``evaluate``,
  ``predict`` and ``smear analyse`` accept the folder wherever a run is accepted;
* ``members.csv`` -- each member's backbone, input size, weight and scores on
  the validation data;
* ``metrics.json`` -- the ensemble's scores on the same data (optimistic: the
  weights were fitted on it; score held-out data with ``leukolab evaluate``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from leukolab.data.readers import LabelledImages, read_labelled
from leukolab.errors import LeukolabError
from leukolab.evaluation.ensemble_weights import OBJECTIVES, balanced_accuracy, fit_weights, log_loss, mix
from leukolab.evaluation.metrics import classification_metrics, write_metrics
from leukolab.evaluation.tables import write_table
from leukolab.pipelines.predictors import (
    ENSEMBLE_FILE,
    Predictor,
    is_ensemble,
    load_predictor,
    predict_paths,
    same_classes,
)
from leukolab.training import distributed
from leukolab.utils.files import atomic_folder, write_text

__all__ = ["EnsembleOptions", "ensemble_summary", "fit_ensemble", "validation_data"]


@dataclass
class EnsembleOptions:
    """How :func:`fit_ensemble` predicts and what it optimises.

    Attributes:
        objective: ``log_loss`` (minimised) or ``balanced_accuracy`` (maximised).
        tta: members predict with the 8-view dihedral test-time augmentation.
        batch_size: images per forward pass.
        show_progress: progress bars over the batches.
        num_workers: image-decoding loader processes.
    """

    objective: str = "log_loss"
    tta: bool = False
    batch_size: int = 128
    show_progress: bool = True
    num_workers: int = 0


def validation_data(data: Path | str) -> LabelledImages:
    """The labelled images of ``data``: its ``val`` split when it has splits, else all of it."""
    parts = read_labelled(data, min_classes=1)
    if "val" in parts:
        return parts["val"]
    if "all" in parts:
        return parts["all"]
    raise LeukolabError(f"{data}: has splits {sorted(parts)} but no val; expected validation images "
                        "(a folder of class folders, or a folder/CSV with a val split)")


def _load_members(members: Sequence[Path | str], tta: bool) -> list[Predictor]:
    predictors = []
    for m in members:
        if is_ensemble(m):
            raise LeukolabError(f"{m} is an ensemble folder; expected leukolab train runs as members")
        predictors.append(load_predictor(m, tta))  # a detector, MIL or pretraining run fails here, one line
    same_classes([(f"member {m}", p) for m, p in zip(members, predictors, strict=True)])
    return predictors


@dataclass
class _Stacked:
    """Every member's probabilities side by side ``(N, M * K)``: each image is decoded once for all members."""

    members: list[Predictor]

    @property
    def class_names(self) -> list[str]:
        return [f"{i}:{c}" for i, m in enumerate(self.members) for c in m.class_names]

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        return np.concatenate([m.predict_images(images, batch_size) for m in self.members], axis=1)


def fit_ensemble(members: Sequence[Path | str], data: Path | str, out: Path | str,
                 options: EnsembleOptions | None = None) -> Path:
    """Fit one weight per member run on the labelled validation ``data``; write the new folder ``out``.

    Members may differ in backbone and input size. Refused with a one-line
    :class:`LeukolabError`: no members, an ensemble/detector/MIL/pretraining run as a
    member, members with different class lists, validation images of a class the
    members do not know, an unknown objective, an existing non-empty ``out``.
    Under torchrun each rank predicts its shard; rank 0 fits and writes.
    """
    opts = options or EnsembleOptions()
    if not members:
        raise LeukolabError("no ensemble members given; expected one or more leukolab train run folders")
    if opts.objective not in OBJECTIVES:
        raise LeukolabError(f"--objective {opts.objective!r}; expected one of: {', '.join(OBJECTIVES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeukolabError(f"{out} already exists and is not empty; refusing to overwrite it")
    distributed.init_distributed()
    runs = [Path(m).resolve() for m in members]
    predictors = _load_members(runs, opts.tta)
    names = list(predictors[0].class_names)
    val = validation_data(data)
    unknown = sorted(set(val.labels) - set(names))
    if unknown:
        raise LeukolabError(f"{data}: class {unknown[0]!r} is unknown to the members; expected only: "
                            f"{', '.join(names)}")
    y = np.asarray(val.targets(names), dtype=np.int64)
    stacked = predict_paths(_Stacked(predictors), val.paths, opts.batch_size, show_progress=opts.show_progress,
                            num_workers=opts.num_workers, desc=f"{len(predictors)} members")

    def fit_and_write() -> Path:
        assert stacked is not None  # rank 0 holds every row
        member_probs = np.split(stacked, len(predictors), axis=1)
        weights = fit_weights(member_probs, y, opts.objective)
        ens = mix(member_probs, weights)
        rows = []
        for run, p, w, prob in zip(runs, predictors, weights, member_probs, strict=True):
            rows.append({"member": str(run), "backbone": getattr(p, "backbone", ""),
                         "img_size": getattr(p, "img_size", None), "weight": float(w),
                         "balanced_accuracy": balanced_accuracy(prob, y), "log_loss": log_loss(prob, y),
                         "accuracy": float(np.mean(prob.argmax(1) == y))})
        metrics = classification_metrics(y, ens.argmax(1), names)
        metrics.update({"log_loss": log_loss(ens, y), "tta": opts.tta, "objective": opts.objective,
                        "weights": [float(w) for w in weights], "members": [str(r) for r in runs],
                        "data": str(Path(data).resolve()),
                        "note": "scored on the data the weights were fitted on (optimistic)"})
        spec = {"members": [str(r) for r in runs], "weights": [float(w) for w in weights], "class_names": names,
                "objective": opts.objective, "data": str(Path(data).resolve()), "tta": opts.tta}

        def fill(tmp: Path) -> None:
            write_text(tmp / ENSEMBLE_FILE, yaml.safe_dump(spec, sort_keys=False))
            write_table(pd.DataFrame(rows), tmp / "members.csv", "ensemble members: weight and validation scores")
            write_metrics(metrics, tmp / "metrics.json", "ensemble on the validation data it was fitted on")

        return atomic_folder(out, fill)

    return distributed.shared_run_dir(fit_and_write)


def ensemble_summary(folder: Path | str) -> str:
    """A few lines on a fitted ensemble: each member's weight and scores, then the ensemble's."""
    folder = Path(folder)
    table = pd.read_csv(folder / "members.csv")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    lines = [f"weight {r.weight:.3f} | balanced accuracy {r.balanced_accuracy:.3f} | log-loss {r.log_loss:.3f} | "
             f"{r.backbone} {r.img_size}px | {r.member}" for r in table.itertuples()]
    lines.append(f"ensemble ({metrics['objective']}{', TTA' if metrics['tta'] else ''}): balanced accuracy "
                 f"{metrics['balanced_accuracy']:.3f} | log-loss {metrics['log_loss']:.3f} | n={metrics['n']} "
                 "(on the fitting data)")
    return "\n".join(lines)
