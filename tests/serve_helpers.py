"""Tiny runs for the ``leukolab serve`` tests, trained once per test session (shared by the API and browser tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from test_smear import _wbc_only  # the same white-cells-only YOLO copy as the smear tests

_CACHE: dict[str, TinyRuns] = {}


@dataclass
class TinyRuns:
    """``root`` (the --runs folder) holds ``detector`` (1-epoch, white cells only), ``classifier`` (1-epoch
    resnet10t, 32 px) and ``ensemble`` (two copies of the classifier); ``fields``: synthetic smear field images."""

    root: Path
    detector: Path
    classifier: Path
    ensemble: Path
    fields: list[Path]


def tiny_runs(base: Path) -> TinyRuns:
    """Train (once per session; later calls return the first result) the runs under ``base``: ~10 s on CPU."""
    if "runs" in _CACHE:
        return _CACHE["runs"]
    from leukolab.data.synthetic import make_wbc_dataset
    from leukolab.data.synthetic.smears import make_smears
    from leukolab.pipelines.classify import train_classifier
    from leukolab.pipelines.detect import train_detector

    smears = make_smears(base / "fields", 8, width=128, height=96, seed=11, scale=0.3, difficulty=0.0,
                         progress=False)
    root = base / "runs"
    detector = train_detector(root / "det", overrides={
        "data.path": str(_wbc_only(smears, base / "wbc")), "data.img_size": 128, "data.batch_size": 4,
        "train.epochs": 1, "model.detector_kwargs": {"backbone": "resnet10t", "channels": 16},
        "train.progress": False, "data.check_images": False, "optim.lr": 5e-3, "optim.warmup_epochs": 0, "seed": 0,
    })
    data = make_wbc_dataset(base / "cells", 12, size=32, seed=0, difficulty=0.0, progress=False)
    classifier = train_classifier(root / "cls", overrides={
        "data.path": str(data), "data.img_size": 32, "data.batch_size": 16, "model.backbone": "resnet10t",
        "model.drop_path": 0.0, "optim.lr": 1e-3, "optim.warmup_epochs": 0, "train.epochs": 1,
        "train.progress": False, "train.keep_last": 1, "seed": 0,
    })
    ensemble = root / "ens"
    ensemble.mkdir()
    rel = f"../cls/{classifier.name}"
    (ensemble / "ensemble.yaml").write_text(
        f"members: [{rel}, {rel}]\nweights: [0.5, 0.5]\n"
        "class_names: [basophil, eosinophil, lymphocyte, monocyte, neutrophil]\n")
    _CACHE["runs"] = TinyRuns(root, detector, classifier, ensemble, sorted((smears / "images").glob("*.jpg")))
    return _CACHE["runs"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (ns): equal snapshots = nothing written there."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}
