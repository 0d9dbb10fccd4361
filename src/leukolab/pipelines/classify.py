"""Train, evaluate and apply an image classifier (the ``train``/``evaluate``/``predict`` commands).

Training goes through the shared run lifecycle (:mod:`leukolab.pipelines.lifecycle`):
this module supplies the splits, the classifier (``model:`` section, head by name
from :data:`~leukolab.registry.HEADS`), the objective (built by name from
:data:`~leukolab.registry.OBJECTIVES`) and the loaders.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import leukolab.objectives  # noqa: F401 - registers the built-in objectives
from leukolab.checkpoints import load_run_state
from leukolab.data.background import BACKGROUND, assign_folds, join, read_background, without
from leukolab.data.checks import require_readable
from leukolab.data.folds_file import read_folds_file, require_inside
from leukolab.data.image_options import ImageOptions, masks_folder
from leukolab.data.mixing import MixConfig
from leukolab.data.preprocess import (
    FIT_IMAGES,
    STAIN_NORM_FILE,
    check_image_options,
    fallbacks_reported_by_caller,
    load_stain_norm,
    save_stain_norm,
)
from leukolab.data.readers import LabelledImages, expand_image_inputs, read_labelled
from leukolab.data.splits import check_fraction, label_fraction_subset, stratified_split
from leukolab.errors import LeukolabError
from leukolab.evaluation.metrics import classification_metrics, write_metrics
from leukolab.evaluation.plots import plot_confusion_matrix, plot_curves
from leukolab.evaluation.tables import write_table
from leukolab.models.backbones import resolve_backbone_name
from leukolab.models.classifier import Classifier, build_classifier
from leukolab.models.weights import checkpoint_backbone_spec, load_backbone_weights
from leukolab.objectives.classification import ClassificationObjective
from leukolab.pipelines.balancing import balance_mode, balanced_train_set, copy_masks, record_class_counts
from leukolab.pipelines.lifecycle import Run, open_run
from leukolab.registry import OBJECTIVES
from leukolab.training import distributed
from leukolab.training.loaders import build_loader
from leukolab.training.loop import pick_device
from leukolab.utils.runs import unique_child


@dataclass
class Splits:
    """The data of one run: train (after the label fraction), val, test and the class names."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    class_names: list[str]
    full_train: LabelledImages


def make_splits(data_cfg: dict[str, Any], seed: int) -> Splits:
    """Read the data, split it when it has no splits, add the background class, apply the label fraction.

    With ``folds_file`` and ``fold`` the split is that fold of the file (:func:`_fold_parts`).
    ``background`` images (:func:`_add_background`) join every split.
    """
    fraction = check_fraction(float(data_cfg["label_fraction"]))
    n_folds = 0
    if data_cfg.get("folds_file"):
        (train, val, test), n_folds = _fold_parts(data_cfg)
    else:
        train, val, test = _folder_parts(data_cfg, seed)
    if data_cfg.get("background"):
        train, val, test = _add_background((train, val, test), data_cfg, seed, n_folds)
    names = list(train.class_names)
    for part in (val, test):
        part.class_names = names
    keep = label_fraction_subset(train.labels, fraction, seed)
    return Splits(train.subset(keep), val, test, names, train)


def _folder_parts(data_cfg: dict[str, Any], seed: int) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """Train, val and test of a folder or CSV (a split it lacks carved out of train, stratified, by seed)."""
    parts = read_labelled(data_cfg["path"])
    if "all" in parts:
        data = parts["all"]
        idx = stratified_split(data.labels, data_cfg["val_fraction"], data_cfg["test_fraction"], seed)
        return data.subset(idx["train"]), data.subset(idx["val"]), data.subset(idx["test"])
    if "train" not in parts:
        raise LeukolabError(f"{data_cfg['path']}: has splits {sorted(parts)} but no 'train'")
    idx = stratified_split(parts["train"].labels, 0.0 if "val" in parts else data_cfg["val_fraction"],
                           0.0 if "test" in parts else data_cfg["test_fraction"], seed)
    val = parts["val"] if "val" in parts else parts["train"].subset(idx["val"])
    test = parts["test"] if "test" in parts else parts["train"].subset(idx["test"])
    return parts["train"].subset(idx["train"]), val, test


def _fold_parts(data_cfg: dict[str, Any]) -> tuple[tuple[LabelledImages, LabelledImages, LabelledImages], int]:
    """Fold ``fold`` of ``folds_file`` as val, the other folds as train; test = its ``split == test`` rows.

    A DATA folder given too must hold every image of the file.
    """
    csv_path = Path(data_cfg["folds_file"])
    split = read_folds_file(csv_path, data_cfg["fold"])
    data = Path(data_cfg["path"])
    if data.resolve() != csv_path.resolve():
        if not data.is_dir():
            raise LeukolabError(f"DATA {data} is not the folds file {csv_path} nor a folder holding its images; "
                                "expected the folds file alone or with the folder of its images")
        require_inside(split, data, csv_path)
    return (split.train, split.val, split.test), split.n_folds


def _add_background(
    parts: tuple[LabelledImages, LabelledImages, LabelledImages], data_cfg: dict[str, Any], seed: int, n_folds: int,
) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """The ``background`` folder's images added to train, val and test as class ``background``.

    They are split on their own, so the other classes keep the split they have without them: by
    ``val_fraction`` / ``test_fraction`` (stratified, by seed) whatever the layout of DATA -- so
    background crops are in val (``best.pt`` is picked with them) and in the run's test split; with a
    folds file they are dealt over its ``n_folds`` folds (seeded) and the run's fold is val. Images
    already in DATA (a DIR inside it) are not added twice.
    """
    bg = without(read_background(data_cfg["background"]), parts)
    names = sorted({*parts[0].class_names, BACKGROUND})
    if n_folds:
        folds = assign_folds(len(bg), n_folds, seed)
        idx = {"train": list(np.flatnonzero(folds != data_cfg["fold"])),
               "val": list(np.flatnonzero(folds == data_cfg["fold"])), "test": []}
    else:  # fewer than 3 images all train
        idx = stratified_split(bg.labels, data_cfg["val_fraction"], data_cfg["test_fraction"], seed)
    train, val, test = (join(part, bg.subset(idx[s]), names) for part, s in zip(parts, ("train", "val", "test"),
                                                                              strict=True))
    return train, val, test


def splits_table(splits: Splits) -> pd.DataFrame:
    """``splits.csv``: one row per image -- path, label, split, and whether its label was used."""
    used = set(map(str, splits.train.paths))
    full = splits.full_train
    rows = [(str(p), lab, "train", str(p) in used) for p, lab in zip(full.paths, full.labels, strict=True)]
    for name, part in (("val", splits.val), ("test", splits.test)):
        rows += [(str(p), lab, name, True) for p, lab in zip(part.paths, part.labels, strict=True)]
    return pd.DataFrame(rows, columns=["path", "label", "split", "labelled"])


def make_loader(
    data: LabelledImages, class_names: list[str], img_size: int, batch_size: int, *, train: bool,
    augment: bool = True, num_workers: int = 0, cache: bool = False, seed: int = 0, min_samples: int = 0,
    balance: bool = False, images: ImageOptions | None = None,
) -> DataLoader:
    """A DataLoader over ``data`` (shuffled, augmented and seeded for training).

    ``min_samples`` > ``len(data)`` makes a training epoch draw that many samples
    (whole reshuffled passes over the data, then a partial one), so that a run on a
    small label fraction still takes a useful number of optimiser steps per epoch.
    Under torchrun each rank reads its own shard instead (``min_samples`` unused).
    ``balance`` (training): every class drawn with equal expectation (``--balance oversample``).
    ``images``: the run's image options (cell crop, masks, stain and background augmentation; default off).
    """
    opts = images or ImageOptions({"img_size": img_size})
    if opts.cfg_data.get("img_size") != img_size:
        opts = replace(opts, cfg_data={**opts.cfg_data, "img_size": img_size})
    targets = data.targets(class_names)
    ds = opts.train_dataset(data.paths, targets, augment, cache) if train else opts.eval_dataset(data.paths, targets,
                                                                                                 cache)
    return build_loader(ds, batch_size, train=train, num_workers=num_workers, seed=seed, min_samples=min_samples,
                        balance_targets=ds.targets if balance else None)


def class_weights(labels: list[str], class_names: list[str]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1."""
    counts = Counter(labels)
    w = torch.tensor([1.0 / max(1, counts.get(c, 0)) for c in class_names])
    return w * len(w) / w.sum()


def build_model(cfg: dict[str, Any], num_classes: int, allow_pickle: bool = False) -> Classifier:
    """The classifier of a config (frozen backbone and probe norm as it says), with ``model.init``
    weights loaded when given (loading keeps a frozen backbone frozen; a pickled init file needs ``allow_pickle``)."""
    adapter = cfg.get("adapter") or {}
    model = build_classifier({**cfg["model"], "adapter": adapter.get("name")}, cfg["data"]["img_size"], num_classes)
    init = cfg["model"].get("init")
    if init:
        load_backbone_weights(model.backbone, init, allow_pickle=allow_pickle)
    if adapter.get("name"):  # after --init: the adapter is trained on (and references) those frozen weights
        model.attach_adapter(adapter["name"], dict(adapter.get(adapter["name"]) or {}), init=init)
    if cfg["model"].get("fuse"):  # the frozen encoders of --fuse, from their runs / checkpoints
        from leukolab.pipelines.fusion import load_fusion_weights

        load_fusion_weights(model, allow_pickle)
    return model


def adopt_init_architecture(cfg: dict[str, Any], allow_pickle: bool = False) -> None:
    """Fill ``model.backbone_kwargs`` (e.g. ``reg_tokens``) from a leukolab ``--init`` checkpoint.

    A checkpoint of another architecture than ``model.backbone`` is refused.
    """
    spec = checkpoint_backbone_spec(cfg["model"]["init"], allow_pickle=allow_pickle)
    if spec is None:
        return
    want, have = resolve_backbone_name(cfg["model"]["backbone"]), resolve_backbone_name(spec.name)
    if want != have:
        raise LeukolabError(
            f"--init {cfg['model']['init']} holds a {have} backbone but --backbone is {want}; "
            "expected a checkpoint of the same architecture"
        )
    cfg["model"]["backbone_kwargs"] = {**spec.kwargs, **(cfg["model"].get("backbone_kwargs") or {})}


def build_objective(cfg: dict[str, Any], splits: Splits, allow_pickle: bool = False) -> ClassificationObjective:
    """The classification objective of a resolved config over ``splits`` (scored by
    :func:`~leukolab.evaluation.metrics.classification_metrics`; training batches mixed as ``mix:`` says)."""
    o = cfg["optim"]
    return OBJECTIVES.build(
        "classification", model=build_model(cfg, len(splits.class_names), allow_pickle),
        class_names=splits.class_names,
        class_weights=class_weights(splits.train.labels, splits.class_names) if o["class_weights"] else None,
        label_smoothing=o["label_smoothing"], layer_decay=float(o.get("layer_decay", 1.0)),
        scorer=classification_metrics, mix=MixConfig.from_config(cfg.get("mix")),
    )


def _prepare(cfg: dict[str, Any], allow_pickle: bool = False) -> None:
    """A new run's options checked and paths made absolute (data, folds file, background, ``--init``);
    the init checkpoint's architecture adopted."""
    d = cfg["data"]
    MixConfig.from_config(cfg.get("mix"))
    d["balance"] = balance_mode(cfg)  # optim.class_weights: true is an alias of balance: weights
    cfg["optim"]["class_weights"] = d["balance"] == "weights"
    if d.get("fold") is not None and not d.get("folds_file"):
        if not str(d["path"] or "").lower().endswith(".csv"):
            raise LeukolabError(f"--fold {d['fold']} needs --folds-file F (a path,label,fold CSV) or DATA being one")
        d["folds_file"] = d["path"]
    if d.get("folds_file"):
        if d.get("fold") is None:
            raise LeukolabError(f"--folds-file {d['folds_file']} needs --fold K, the validation fold (0..K-1)")
        d["folds_file"] = str(Path(d["folds_file"]).resolve())
        d["path"] = d["path"] or d["folds_file"]
    if not d["path"]:
        raise LeukolabError("no data given; expected a folder of class folders or a path,label CSV")
    d["path"] = str(Path(d["path"]).resolve())
    if d.get("background"):
        d["background"] = str(Path(d["background"]).resolve())
        read_background(d["background"])  # a missing or empty folder fails before anything is written
    check_image_options(d)
    if not d.get("masks") and (d["crop"] == "cell" or d["mask_aug"] > 0):  # recorded: the masks/ beside the classes
        found = masks_folder(d)
        d["masks"] = str(found.resolve()) if found is not None else None
    if cfg["model"].get("fuse"):  # frozen encoders: recorded, the shared input size set, the backbone frozen
        from leukolab.pipelines.fusion import prepare_fusion

        prepare_fusion(cfg, allow_pickle)
    if cfg["model"].get("init"):
        cfg["model"]["init"] = str(Path(cfg["model"]["init"]).resolve())
        adopt_init_architecture(cfg, allow_pickle)


def image_options(run: Run, train_paths: list[Path], fit_paths: list[Path],
                  tables: dict[str, pd.DataFrame] | None = None) -> ImageOptions:
    """The image options of a run for its loaders: the mask files of ``train_paths`` and, with ``stain_norm``,
    the normaliser fitted on ``stain_ref`` or on ``fit_paths`` (prepared as for training) and written to
    ``RUN/stain_norm.yaml`` (creating the run folder with ``tables``); a resumed run reads the one it wrote."""
    d = run.cfg["data"]
    images = ImageOptions.for_run(d, train_paths, run.seed)
    name = str(d.get("stain_norm") or "none")
    if name == "none":
        return images
    if run.resumed and run.dir is not None and (run.dir / STAIN_NORM_FILE).is_file():
        return images.with_normaliser(load_stain_norm(run.dir, name))
    images = images.fitted(fit_paths)
    run_dir = run.create(tables)
    if distributed.is_main() and images.normaliser is not None:
        reference = d.get("stain_ref") or f"{min(len(fit_paths), FIT_IMAGES)} training images"
        save_stain_norm(run_dir, images.normaliser, str(reference))
    return images


def train_classifier(
    out: Path | str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | str | None = None,
    name: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Train a classifier; returns the run folder (``allow_pickle``: read a pickled ``model.init`` file).

    A new run gets a fresh folder under ``out``. ``resume`` continues the
    interrupted run in that folder with its saved config; overrides that
    disagree with it are refused.
    """
    run = open_run("train", out, config_file, overrides, resume,
                   prepare=lambda c: _prepare(c, allow_pickle), name=name or (
        lambda c: f"{c['model']['backbone']}-f{c['data']['label_fraction']:g}-s{c['seed']}"
        + (f"-fold{c['data']['fold']}" if c["data"].get("fold") is not None else "")))
    cfg, d = run.cfg, run.cfg["data"]
    splits = make_splits(d, run.seed)
    objective = build_objective(cfg, splits, allow_pickle)  # a bad backbone/init fails before the image check
    if distributed.is_main():
        counts = objective.model.parameter_counts()
        print(f"trainable parameters: {counts['trainable_params']:,} ({100 * counts['trainable_share']:.2f} %), "
              f"adapter {counts['adapter']}", flush=True)
    if d["check_images"] and not run.resumed:
        require_readable([*splits.full_train.paths, *splits.val.paths, *splits.test.paths], cfg["train"]["progress"])
    loader_kw = dict(num_workers=d["num_workers"], cache=d["cache_images"], seed=run.seed)
    mode, tables = balance_mode(cfg), {"splits.csv": splits_table(splits)}
    train_set = balanced_train_set(run, splits.train, splits.class_names, mode, tables, cfg["train"]["progress"])
    images = image_options(run, train_set.paths, splits.train.paths, tables)
    images.mask_files.update(copy_masks(run))  # --balance augment copies carry their source's transformed mask
    train_loader = make_loader(
        train_set, splits.class_names, d["img_size"], d["batch_size"], train=True, augment=d["augment"],
        min_samples=int(d.get("min_samples_per_epoch") or 0), balance=mode == "oversample", images=images,
        **loader_kw,
    )
    val_loader = (
        make_loader(splits.val, splits.class_names, d["img_size"], d["batch_size"] * 2, train=False, images=images,
                    **loader_kw)
        if len(splits.val) else None
    )
    record_class_counts(run, mode, splits.train, train_set, splits.class_names,
                        len(train_loader.sampler) * distributed.world_size(), objective.class_weights, tables)
    if cfg["model"].get("fuse"):  # nothing below the head trains: its features are computed once when possible
        from leukolab.pipelines.fusion import fusion_loaders

        train_loader, val_loader = fusion_loaders(cfg, objective.model, train_loader, val_loader)
    run.fit(objective, train_loader, val_loader, tables=tables)
    return run.dir


# --------------------------------------------------------------------------- loading and applying a run
def load_run(run: Path | str, device: torch.device | None = None,
             state: dict[str, Any] | None = None) -> tuple[ClassificationObjective, dict[str, Any]]:
    """The trained classifier of a run folder (``best.pt``, read with ``weights_only=True``) and its config.

    ``state``: the run's checkpoint when the caller has read it already (:func:`load_run_state`).
    """
    state = state if state is not None else load_run_state(run, "classification", "train")
    cfg = state["config"]
    record = state.get("adapter") if isinstance(state.get("adapter"), dict) else None
    model = build_classifier({**cfg["model"], "init": None, "adapter": record["config"]["name"] if record else None},
                             cfg["data"]["img_size"], len(state["class_names"]))
    if record:  # an adapter run: its frozen backbone (--init file or stored) + the adapter
        from leukolab.models.adapters.state import load_frozen_backbone

        load_frozen_backbone(model.backbone, record, state.get("backbone"))
        options = {k: v for k, v in record["config"].items() if k != "name"}
        model.attach_adapter(record["config"]["name"], options, init=record.get("init"))
    objective = ClassificationObjective(model, state["class_names"])
    objective.load_state_dict(state["objective"], strict=False)
    device = device or pick_device(cfg["train"].get("device", "auto"))
    return objective.to(device).eval(), cfg


def _test_split(run: Path) -> LabelledImages:
    """The test split of a run folder (from its ``splits.csv``)."""
    folder = run.parent if run.is_file() else run
    splits_csv = folder / "splits.csv"
    if not splits_csv.is_file():
        raise LeukolabError(f"{folder}: no splits.csv; pass --data TEST_DIR")
    df = pd.read_csv(splits_csv)
    df = df[df["split"] == "test"]
    if df.empty:
        raise LeukolabError(f"{folder}: the run has no test split; pass --data TEST_DIR")
    return LabelledImages([Path(p) for p in df["path"]], list(df["label"].astype(str)))


def _eval_data(data: Path | str | None, run: Path) -> LabelledImages:
    """The labelled images to evaluate on: ``data`` (its test split, else all of it) or, by default, the
    test split of the run -- of an ensemble, the test split its members share (refused when they differ)."""
    if data is None:
        from leukolab.pipelines.predictors import ensemble_members, is_ensemble

        if not is_ensemble(run):
            return _test_split(run)
        tests = [_test_split(m) for m in ensemble_members(run)]
        if any(set(t.paths) != set(tests[0].paths) for t in tests[1:]):
            raise LeukolabError(f"{run}: the ensemble's members have different test splits; pass --data TEST_DIR")
        return tests[0]
    parts = read_labelled(data, min_classes=1)
    return parts.get("test") or parts.get("all") or next(iter(parts.values()))


def evaluate_run(
    run: Path | str, data: Path | str | None = None, out: Path | None = None, batch_size: int = 128,
    check_images: bool = True, show_progress: bool = True, tta: bool | None = None, num_workers: int = 0,
) -> Path:
    """Evaluate a run or an ensemble folder on ``data`` (default: the run's own test split); returns the folder
    written.

    Writes ``metrics.json`` (with ``log_loss`` and ``tta``), ``predictions.csv``, ``confusion_matrix.png`` and,
    when the run has a history, ``curves.png`` into a new folder (``RUN/eval``, ``RUN/eval-2``, ... or
    ``ENSEMBLE/eval`` ...). ``tta``: average over the 8 dihedral views (``None``: an ensemble's own setting,
    off for a run). Under torchrun each rank predicts its shard of the images and rank 0 writes.
    """
    from leukolab.evaluation.ensemble_weights import log_loss
    from leukolab.pipelines.predictors import load_predictor, predict_paths

    run = Path(run)
    distributed.init_distributed()
    predictor = load_predictor(run, tta)
    test = _eval_data(data, run)
    names = list(predictor.class_names)
    y = np.asarray(test.targets(names), dtype=np.int64)
    if check_images:
        require_readable(distributed.shard(test.paths), show_progress and distributed.is_main())
    with fallbacks_reported_by_caller():  # images kept whole are counted in one line (_report_fallbacks)
        probs = predict_paths(predictor, test.paths, batch_size, show_progress=show_progress,
                              num_workers=num_workers, desc="evaluating")

    def write() -> Path:
        assert probs is not None  # rank 0 holds every row
        pred = probs.argmax(1)
        metrics = classification_metrics(y, pred, names)
        metrics["log_loss"] = log_loss(probs, y)
        metrics["tta"] = bool(getattr(predictor, "tta", False))
        metrics["model"] = str(run)
        metrics["data"] = str(data) if data is not None else "test split of the run"
        fallbacks = _report_fallbacks(predictor)
        if fallbacks:
            metrics["whole_image_fallbacks"] = fallbacks
        out_dir = unique_child(run, "eval") if out is None else unique_child(Path(out).parent, Path(out).name)
        write_metrics(metrics, out_dir / "metrics.json")
        table = pd.DataFrame({"path": [str(p) for p in test.paths], "actual": [names[i] for i in y],
                              "predicted": [names[i] for i in pred]})
        for i, c in enumerate(names):
            table[f"prob_{c}"] = probs[:, i]
        write_table(table, out_dir / "predictions.csv", "predictions, one row per image")
        plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), names, out_dir / "confusion_matrix.png")
        if (run / "history.csv").is_file():
            plot_curves(pd.read_csv(run / "history.csv"), out_dir / "curves.png", title=run.name)
        return out_dir

    return distributed.shared_run_dir(write)


def _report_fallbacks(predictor: Any) -> int:
    """How many images the run's cell crop found no cell in (used whole), said on stderr when any."""
    n = int(getattr(predictor, "fallbacks", 0) or 0)
    if n:
        print(f"warning: no cell found in {n} image(s); they were classified whole (--crop cell)", file=sys.stderr)
    return n


def predict_images(
    run: Path | str, inputs: list[Path], batch_size: int = 128, tta: bool | None = None,
    show_progress: bool = False, num_workers: int = 0,
) -> pd.DataFrame | None:
    """Predicted class and per-class probabilities for image files and/or folders, by a run or an ensemble
    folder (``tta``: as in :func:`evaluate_run`).

    Under torchrun each rank predicts its shard of the images; the table is returned on rank 0 and
    ``None`` on the other ranks.
    """
    from leukolab.pipelines.predictors import load_predictor, predict_paths

    distributed.init_distributed()
    predictor = load_predictor(run, tta)
    paths = expand_image_inputs(inputs)
    require_readable(distributed.shard(paths), show_progress=False)
    names = list(predictor.class_names)
    with fallbacks_reported_by_caller():  # images kept whole are counted in one line (_report_fallbacks)
        probs = predict_paths(predictor, paths, batch_size, show_progress=show_progress, num_workers=num_workers)
    if probs is None:
        return None
    _report_fallbacks(predictor)
    table = pd.DataFrame({"path": [str(p) for p in paths], "predicted": [names[i] for i in probs.argmax(1)]})
    for i, c in enumerate(names):
        table[f"prob_{c}"] = probs[:, i]
    return table


def dataset_stats(data: Path | str, fractions: tuple[float, ...] = (0.5, 0.1, 0.01), seed: int = 0,
                  val_fraction: float = 0.15, test_fraction: float = 0.15) -> pd.DataFrame:
    """Per-class image counts: train / val / test and the training subset at each label fraction."""
    base = {"path": str(data), "val_fraction": val_fraction, "test_fraction": test_fraction, "label_fraction": 1.0}
    splits = make_splits(base, seed)
    rows = {}
    for c in splits.class_names:
        rows[c] = {"train": splits.full_train.labels.count(c), "val": splits.val.labels.count(c),
                   "test": splits.test.labels.count(c)}
    for f in fractions:
        check_fraction(f)
        keep = label_fraction_subset(splits.full_train.labels, f, seed)
        counts = Counter(splits.full_train.labels[i] for i in keep)
        for c in splits.class_names:
            rows[c][f"train@{f:g}"] = counts.get(c, 0)
    table = pd.DataFrame(rows).T
    table.loc["total"] = table.sum()
    table.index.name = "class"
    return table


def metrics_summary(metrics_path: Path) -> str:
    """A one-line summary of a metrics.json file."""
    m = json.loads(Path(metrics_path).read_text())
    line = (f"accuracy {m['accuracy']:.3f} | balanced accuracy {m['balanced_accuracy']:.3f} | "
            f"macro F1 {m['f1_macro']:.3f} | n={m['n']}")
    # a collapsed model: fewer classes predicted than the data holds (a class the data lacks, e.g. the
    # background class of a smear classifier on clean cell crops, is not expected among the predictions)
    n_classes = int(m.get("n_classes_present") or len(m.get("class_names", [])))
    if m.get("n_predicted_classes", n_classes) < n_classes:
        line += f" | WARNING: predicts only {m['n_predicted_classes']} of the {n_classes} classes in the data"
    return line
