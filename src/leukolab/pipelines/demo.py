"""The main job on the embedded default: synthesise WBCs, train, evaluate, report paths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from leukolab.data.synthetic import make_wbc_dataset
from leukolab.pipelines.classify import evaluate_run, metrics_summary, train_classifier
from leukolab.utils.runs import new_run_dir

#: the demo's model and data: a small ResNet at 64 px trains well on 2 CPU cores (~7 s an epoch)
DEMO_DEFAULTS: dict[str, Any] = {
    "n_per_class": 240,
    "size": 64,
    "difficulty": 0.5,
    "backbone": "resnet10t",
    "epochs": 15,
    "lr": 2e-3,
    "batch_size": 64,
}


def run_demo(out: Path | str, seed: int = 0, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the demo into a new folder under ``out``; returns paths, timings and metrics."""
    t0 = time.perf_counter()
    cfg = dict(DEMO_DEFAULTS)
    if quick:
        cfg.update(n_per_class=40, epochs=2)
    root = new_run_dir(out, "demo")
    data = make_wbc_dataset(root / "data", cfg["n_per_class"], size=cfg["size"], seed=seed,
                            difficulty=cfg["difficulty"], progress=progress)
    t_data = time.perf_counter() - t0
    run_dir = train_classifier(
        root / "runs",
        overrides={
            "data.path": str(data), "data.img_size": cfg["size"], "data.batch_size": cfg["batch_size"],
            "model.backbone": cfg["backbone"], "model.drop_path": 0.0, "optim.lr": cfg["lr"],
            "optim.warmup_epochs": 1, "train.epochs": cfg["epochs"], "train.progress": progress, "seed": seed,
        },
        name=cfg["backbone"],
    )
    t_train = time.perf_counter() - t0 - t_data
    eval_dir = evaluate_run(run_dir, show_progress=progress)
    return {
        "root": root, "data": data, "run": run_dir, "eval": eval_dir,
        "summary": metrics_summary(eval_dir / "metrics.json"),
        "seconds": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
    }
