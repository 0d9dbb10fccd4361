"""The main job on the embedded default: synthesise WBCs, train, evaluate, report paths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from leukolab.data.synthetic import make_pool, make_wbc_dataset
from leukolab.pipelines.classify import evaluate_run, metrics_summary, train_classifier
from leukolab.pipelines.experiment import run_label_efficiency
from leukolab.pipelines.pretrain import pretrain
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


#: ``demo --full`` adds: an unlabelled pool, MAE pretraining of a ViT-tiny on it, and the
#: label-efficiency experiment (scratch vs MAE init at 10 % and 1 % labels) on a larger labelled
#: set than the demo's (1 % of 240 cells/class would leave one labelled cell per class)
FULL_DEFAULTS: dict[str, Any] = {
    "n_per_class": 1000,
    "pool_n": 6000,
    "tissue_fraction": 0.3,
    "pretrain_backbone": "vit_tiny_patch16",
    "pretrain_epochs": 12,
    "pretrain_batch_size": 128,
    "pretrain_base_lr": 1.5e-3,  # 3e-3 learned faster in 5-epoch trials but fine-tuned worse after 18 (measured)
    "fractions": (0.1, 0.01),
    "seeds": 1,
    "finetune_epochs": 12,
    "min_samples_per_epoch": 512,
}


def run_demo(
    out: Path | str, seed: int = 0, quick: bool = False, progress: bool = True, full: bool = False
) -> dict[str, Any]:
    """Run the demo into a new folder under ``out``; returns paths, timings and metrics.

    ``full`` also pretrains an MAE on a synthetic unlabelled pool and runs the
    label-efficiency experiment (from scratch vs MAE init) on a labelled set of
    ``FULL_DEFAULTS["n_per_class"]`` cells per class (``data_full/``).
    """
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
    result: dict[str, Any] = {
        "root": root, "data": data, "run": run_dir, "eval": eval_dir,
        "summary": metrics_summary(eval_dir / "metrics.json"),
        "seconds": {"data": t_data, "train": t_train},
    }
    if full:
        result.update(_pretrain_and_compare(root, seed, quick, progress))
    result["seconds"]["total"] = time.perf_counter() - t0
    return result


def _pretrain_and_compare(root: Path, seed: int, quick: bool, progress: bool) -> dict[str, Any]:
    """Labelled set + pool -> MAE pretraining -> label-efficiency experiment; paths and timings."""
    f = dict(FULL_DEFAULTS)
    if quick:
        f.update(n_per_class=40, pool_n=200, pretrain_epochs=1, finetune_epochs=1, min_samples_per_epoch=0)
    t0 = time.perf_counter()
    data = make_wbc_dataset(root / "data_full", f["n_per_class"], size=DEMO_DEFAULTS["size"], seed=seed,
                            difficulty=DEMO_DEFAULTS["difficulty"], progress=progress)
    pool = make_pool(root / "pool", f["pool_n"], size=DEMO_DEFAULTS["size"], seed=seed + 1,
                     tissue_fraction=f["tissue_fraction"], difficulty=DEMO_DEFAULTS["difficulty"], progress=progress)
    mae_run = pretrain(root / "pretrain", overrides={
        "method": "mae", "data.paths": [str(pool)], "data.img_size": DEMO_DEFAULTS["size"],
        "data.batch_size": f["pretrain_batch_size"], "data.check_images": False,
        "model.backbone": f["pretrain_backbone"], "optim.base_lr": f["pretrain_base_lr"],
        "optim.warmup_ratio": 0.1, "train.epochs": f["pretrain_epochs"], "train.progress": progress, "seed": seed,
    }, name="mae")
    t_pretrain = time.perf_counter() - t0
    experiment = run_label_efficiency(
        data, root / "label_efficiency", {"mae": str(mae_run / "last.pt")}, f["fractions"], f["seeds"],
        base_overrides={"train.epochs": f["finetune_epochs"], "optim.warmup_epochs": 1,
                        "data.min_samples_per_epoch": f["min_samples_per_epoch"]},
        log=lambda msg: print(msg, flush=True) if progress else None,
    )
    return {
        "pool": pool, "pretrain": mae_run, "experiment": experiment,
        "table": (experiment / "label_efficiency.md").read_text(),
        "seconds_full": {"pretrain": t_pretrain, "experiment": time.perf_counter() - t0 - t_pretrain},
    }
