"""Patient-level diagnosis by multiple-instance learning: ``mil train | evaluate | predict`` and ``synth patients``.

The fast path: a frozen encoder embeds every cell once
(:func:`leukolab.pipelines.mil_encoder.embed_cohort`, cached), then a small
aggregator (:data:`leukolab.registry.AGGREGATORS`) learns from the cached
embeddings plus clinical features, through the one run lifecycle
(:func:`leukolab.pipelines.lifecycle.open_run`) and the one Trainer, with the
:class:`~leukolab.objectives.mil.MILObjective`. With ``encoder.finetune`` the
objective holds the encoder too and trains end to end on ``cells_per_bag``
cells drawn from each bag per step; with ``encoder.adapter`` as well (a ViT
encoder) the encoder stays frozen and an adapter of
:mod:`leukolab.models.adapters` trains with the aggregator (options in
``encoder.adapter_kwargs.<name>``), the checkpoints keeping the small adapter
and referencing the encoder's file.

``train_mil`` fits one model on all the patients it is given (a validation part
carved out by patient picks the best epoch); with ``cv.folds`` it also
cross-validates by patient -- every aggregator of ``cv.compare`` with and
without clinical features, and the clinical-only logistic regression, in the
same folds -- and writes the comparison table (:mod:`leukolab.pipelines.mil_cv`).
``evaluate_mil`` / ``predict_mil`` apply a run to a cohort and write
predictions, per-cell attention weights, galleries and an HTML report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torchvision.transforms import v2

import leukolab.objectives.mil  # noqa: F401 - registers the "mil" objective
from leukolab.checkpoints import load_checkpoint, load_run_state
from leukolab.data.mil import (
    CLASS_NAMES,
    BagDataset,
    Cohort,
    check_clinical_features,
    collate_bags,
    patient_folds,
    patient_split,
    read_cohort,
)
from leukolab.data.synthetic.patients import PatientOptions, make_patients
from leukolab.errors import LeukolabError
from leukolab.evaluation.metrics import write_metrics
from leukolab.evaluation.mil import attention_frame, mil_metrics, mil_scorer, plot_attention_gallery
from leukolab.evaluation.plots import plot_confusion_matrix
from leukolab.evaluation.report import write_report
from leukolab.evaluation.tables import write_table
from leukolab.models.adapters import Adapter, apply_adapter, load_adapter, parameter_summary
from leukolab.models.backbones import is_vit
from leukolab.models.mil import build_aggregator
from leukolab.models.morphology import names_morphology
from leukolab.objectives.mil import MILObjective
from leukolab.pipelines.lifecycle import Run, open_run
from leukolab.pipelines.mil_encoder import Encoder, embed_cohort, load_encoder
from leukolab.registry import ADAPTERS, AGGREGATORS, OBJECTIVES
from leukolab.training.loaders import build_loader
from leukolab.training.loop import TrainerConfig, move_to, pick_device
from leukolab.utils.runs import unique_child

__all__ = [
    "BagData",
    "PatientOptions",
    "Predictions",
    "evaluate_mil",
    "fit_fold",
    "load_mil_run",
    "predict_mil",
    "synth_patients",
    "train_mil",
]


def synth_patients(out: Path | str, options: PatientOptions | None = None, progress: bool = True) -> Path:
    """A synthetic lymphocytosis cohort in a new folder (see :mod:`leukolab.data.synthetic.patients`)."""
    return make_patients(out, options, progress=progress)


# ---------------------------------------------------------------------------------------------- config
def reference_date(cfg: dict[str, Any]) -> date:
    """``data.reference_date`` as a date."""
    from leukolab.data.mil import parse_date

    return parse_date(cfg["data"]["reference_date"], "data.reference_date")


def _prepare(cfg: dict[str, Any]) -> None:
    """Check a new run's options and make its paths absolute (nothing is read or written yet)."""
    d, m = cfg["data"], cfg["model"]
    if not d["bags"]:
        raise LeukolabError("no bags folder given; expected one folder of cell images per patient")
    d["bags"] = str(Path(d["bags"]).resolve())
    if d["clinical"]:
        d["clinical"] = str(Path(d["clinical"]).resolve())
    reference_date(cfg)
    m["clinical_features"] = list(check_clinical_features(m["clinical_features"]))
    for name in cfg["cv"]["compare"]:
        AGGREGATORS.get(name)  # an unknown name fails before any work
    if getattr(AGGREGATORS.get(m["aggregator"]), "needs_clinical", False) and not m["clinical_features"]:
        raise LeukolabError(f"aggregator {m['aggregator']!r} needs clinical features; pass --clinical-features")
    enc = cfg["encoder"]
    if enc["model"] is None:
        raise LeukolabError("no --encoder given; expected a leukolab run or checkpoint, a converted backbone, "
                            "or a timm model name")
    if Path(str(enc["model"])).exists():
        enc["model"] = str(Path(enc["model"]).resolve())
    if enc["cache"]:
        enc["cache"] = str(Path(enc["cache"]).resolve())
    per_bag = enc.get("cells_per_bag")
    if isinstance(per_bag, bool) or not isinstance(per_bag, int) or per_bag < 1:
        raise LeukolabError(f"--cells-per-bag {per_bag}: expected a whole number >= 1 (cells drawn per bag and step "
                            "when fine-tuning, e.g. 16)")
    if names_morphology(enc["model"]) and enc["finetune"]:
        raise LeukolabError("--encoder morphology has no weights to fine-tune; drop --finetune-encoder (its "
                            "features are computed once and cached)")
    if enc.get("adapter"):
        if not enc["finetune"]:
            raise LeukolabError(f"--adapter {enc['adapter']} trains through the encoder; expected it with "
                                "--finetune-encoder (cached embeddings train the aggregator only)")
        ADAPTERS.get(enc["adapter"])  # an unknown name fails before any work
    folds, repeats = int(cfg["cv"]["folds"] or 0), int(cfg["cv"]["repeats"])
    if folds == 1 or folds < 0 or repeats < 1:
        raise LeukolabError(f"--folds {folds} / --repeats {repeats}: expected folds 0 (none) or >= 2, repeats >= 1")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class BagData:
    """A cohort ready for training: cached cell embeddings, clinical matrix and labels.

    ``features`` is per patient ``(n_i, D)``; ``clinical`` holds the features
    named in ``clinical_names`` (raw; models standardise them).
    """

    cohort: Cohort
    features: list[torch.Tensor]
    clinical: np.ndarray
    clinical_names: tuple[str, ...]
    labels: np.ndarray

    @classmethod
    def of(cls, cohort: Cohort, features: list[torch.Tensor], clinical_names: tuple[str, ...]) -> BagData:
        return cls(cohort, features, cohort.clinical(clinical_names), clinical_names, cohort.labels())


def dataset(
    data: BagData, index: np.ndarray, cfg: dict[str, Any], *, train: bool, features: tuple[str, ...] | None = None,
    encoder: Encoder | None = None,
) -> BagDataset:
    """The bags at ``index``: cached embeddings, or cell images when ``encoder`` (fine-tuning) is given.

    ``features`` picks clinical columns (a subset of ``data.clinical_names``; default all).
    """
    d = cfg["data"]
    cols = [data.clinical_names.index(f) for f in (features if features is not None else data.clinical_names)]
    clinical = data.clinical[index][:, cols]
    if encoder is None:
        return BagDataset([data.features[i] for i in index], clinical, data.labels[index], max_cells=d["max_cells"],
                          sample=train, keep_fraction=d["keep_fraction"], min_cells=d["min_cells"])
    base = encoder.image_transform()
    tf = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), base]) if train else base
    per_bag = int(cfg["encoder"]["cells_per_bag"])
    return BagDataset([data.cohort.patients[i].cells for i in index], clinical, data.labels[index], transform=tf,
                      max_cells=per_bag if train else 0, sample=train, keep_fraction=1.0, min_cells=per_bag)


def loader(ds: BagDataset, cfg: dict[str, Any], *, train: bool, seed: int) -> Any:
    """Bag batches (shuffled and seeded for training; an epoch draws each bag ``data.passes_per_epoch`` times)."""
    d = cfg["data"]
    return build_loader(ds, int(d["batch_size"]), train=train, num_workers=int(d["num_workers"]), seed=seed,
                        min_samples=int(d["passes_per_epoch"]) * len(ds) if train else 0, collate_fn=collate_bags)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights of labels 0/1, normalised to mean 1."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    w = 1.0 / np.maximum(counts, 1.0)
    return torch.tensor(w * 2 / w.sum(), dtype=torch.float32)


def adapter_options(cfg: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(encoder.adapter, its options from encoder.adapter_kwargs.<name>)``; ``(None, {})`` without one."""
    enc = cfg["encoder"]
    name = enc.get("adapter")
    if not name or not enc.get("finetune"):
        return None, {}
    return str(name), dict(((enc.get("adapter_kwargs") or {}).get(name)) or {})


def adapt_encoder(encoder: Encoder, name: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Adapter]:
    """``(a frozen copy of encoder.model with the adapter hooked in, the adapter)``.

    Raises:
        LeukolabError: the encoder is not a timm ViT, or an adapter option is out of range.
    """
    if not is_vit(encoder.model):
        raise LeukolabError(f"--adapter {name} needs a ViT encoder; {encoder.source} is a "
                            f"{type(encoder.model).__name__} (fine-tune it whole with --finetune-encoder alone)")
    model = copy.deepcopy(encoder.model)
    return model, apply_adapter(model, name, **options)


def build_objective(
    cfg: dict[str, Any], data: BagData, train_idx: np.ndarray, aggregator: str, features: tuple[str, ...],
    encoder: Encoder,
) -> MILObjective:
    """An untrained objective for ``aggregator`` over ``features``, normalised with the training patients."""
    m, o = cfg["model"], cfg["optim"]
    options = {"hidden": int(m["hidden"]), "dropout": float(m["dropout"]), **(m.get("options") or {})}
    agg = build_aggregator(aggregator, encoder.dim, len(features), **options)
    cols = [data.clinical_names.index(f) for f in features]
    agg.set_normalisation(torch.cat([data.features[i] for i in train_idx]),
                          torch.from_numpy(data.clinical[train_idx][:, cols]))
    if features and m.get("clinical_init", True):
        z = (torch.from_numpy(data.clinical[train_idx][:, cols]) - agg.clin_mean) / agg.clin_std
        lr = LogisticRegression(class_weight="balanced", max_iter=1000).fit(z.numpy(), data.labels[train_idx])
        agg.init_clinical(torch.from_numpy(lr.coef_[0]).float(), float(lr.intercept_[0]))
    finetune = bool(cfg["encoder"]["finetune"])
    extras = {"aggregator": aggregator, "aggregator_options": options, "in_dim": encoder.dim,
              "clinical_features": list(features), "encoder": encoder.describe(), "class_names": list(CLASS_NAMES),
              "finetuned": finetune}
    name, adapter_kw = adapter_options(cfg)
    model, adapter = copy.deepcopy(encoder.model) if finetune else None, None
    if name:
        model, adapter = adapt_encoder(encoder, name, adapter_kw)
    return OBJECTIVES.build(
        "mil", aggregator=agg, encoder=model, train_encoder=finetune,
        encoder_spec=encoder.spec, pool=encoder.pool,
        class_weights=class_weights(data.labels[train_idx]) if o["class_weights"] else None,
        aux_weight=float(o["aux_weight"]), scorer=mil_scorer, extras=extras,
        adapter=adapter, encoder_init=encoder.source if adapter is not None and encoder.kind != "timm" else None,
    )


# ---------------------------------------------------------------------------------------------- fit / predict
@dataclass
class Predictions:
    """Per patient (in the order asked): tumoral probability, cell weights over the whole bag, MoE gate (or NaN)."""

    probability: np.ndarray
    attention: list[np.ndarray]
    gate: np.ndarray


@torch.no_grad()
def predict(objective: MILObjective, ds: BagDataset, cfg: dict[str, Any], device: torch.device) -> Predictions:
    """Run ``objective`` over every bag of ``ds`` (whole bags, no sampling)."""
    objective.eval().to(device)
    n = len(ds)
    prob = np.zeros(n)
    gate = np.full(n, np.nan)
    attention: list[np.ndarray] = [np.zeros(len(b)) for b in ds.bags]
    for batch in loader(ds, cfg, train=False, seed=0):
        batch = move_to(batch, device)
        out = objective(batch)
        p = torch.softmax(out.logits.float(), 1)[:, 1].cpu().numpy()
        for b, i in enumerate(batch["index"].tolist()):
            prob[i] = p[b]
            keep = batch["mask"][b]
            attention[i][batch["cells"][b][keep].cpu().numpy()] = out.attention[b][keep].float().cpu().numpy()
            if "gate" in out.extras:
                gate[i] = float(out.extras["gate"][b])
    return Predictions(prob, attention, gate)


def fit_fold(
    run: Run, cfg: dict[str, Any], data: BagData, train_idx: np.ndarray, val_idx: np.ndarray, aggregator: str,
    features: tuple[str, ...], encoder: Encoder, trainer_config: TrainerConfig | None = None, curves: bool = True,
    tables: dict[str, pd.DataFrame] | None = None,
) -> MILObjective:
    """Train one model on ``train_idx`` (best epoch by validation loss on ``val_idx``) in ``run``'s folder;
    returns the objective with the best weights loaded.

    ``curves=False`` (cross-validation folds, whose folder ``run.dir`` already
    exists) skips drawing ``curves.png``: matplotlib costs more than a fold's
    training. Either way the fold trains through :meth:`Run.fit`.
    """
    finetune = bool(cfg["encoder"]["finetune"])
    objective = build_objective(cfg, data, train_idx, aggregator, features, encoder)
    enc = encoder if finetune else None
    train_loader = loader(dataset(data, train_idx, cfg, train=True, features=features, encoder=enc), cfg,
                          train=True, seed=run.seed)
    val_loader = loader(dataset(data, val_idx, cfg, train=False, features=features, encoder=enc), cfg,
                        train=False, seed=run.seed)
    if curves:  # the main run (cross-validation folds stay quiet)
        print(f"trainable parameters: {parameter_summary(objective)}"
              + (f", adapter {objective.adapter.config()}" if objective.adapter is not None else ""), flush=True)
    trainer = run.fit(objective, train_loader, val_loader, trainer_config=trainer_config, tables=tables,
                      curves=curves)
    assert run.dir is not None
    best = run.dir / "best.pt"
    if best.is_file():
        objective.load_state_dict(load_checkpoint(best)["objective"])
    return trainer.objective  # type: ignore[return-value]


def _run_name(cfg: dict[str, Any]) -> str:
    clin = "+clin" if cfg["model"]["clinical_features"] else ""
    return f"mil-{cfg['model']['aggregator']}{clin}-s{cfg['seed']}"


def train_mil(
    out: Path | str | None = None,
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Train a patient-level model (and, with ``cv.folds``, cross-validate); returns the run folder.

    The run folder holds what every task's does (``config.yaml``, ``history.csv``,
    ``curves.png``, ``best.pt``/``last.pt``), ``patients.csv`` (with each
    patient's part), ``val_metrics.json`` / ``val_predictions.csv`` of the
    validation patients, and with folds ``cv/`` plus ``cv_table.csv`` / ``.md``.
    """
    run = open_run("mil", out, config_file, overrides, resume, name=_run_name, prepare=_prepare)
    cfg = run.cfg
    cohort = read_cohort(cfg["data"]["bags"], cfg["data"]["clinical"], reference_date(cfg), require_labels=True)
    folds = int(cfg["cv"]["folds"] or 0)
    if folds:
        patient_folds(cohort.labels(), folds, run.seed)  # too few patients per class: refused before any work
    enc_cfg = cfg["encoder"]
    encoder = load_encoder(enc_cfg["model"], enc_cfg["img_size"], enc_cfg["norm"], enc_cfg["pool"], run.seed,
                           allow_pickle)
    name, adapter_kw = adapter_options(cfg)
    if name:  # a CNN encoder or a bad adapter option fails before any embedding (the probe is removed again)
        adapt_encoder(encoder, name, adapter_kw)[1].remove()
    device = pick_device(cfg["train"]["device"])
    runs = Path(resume).parent if resume is not None else Path(out) if out is not None else None
    if runs is None:
        raise LeukolabError("no --out folder given for the run")
    cache = enc_cfg["cache"] or runs / ".mil-cache"
    feats = embed_cohort(cohort, encoder, cache, int(enc_cfg["batch_size"]), device, bool(cfg["train"]["progress"]))
    clin = tuple(cfg["model"]["clinical_features"])
    data = BagData.of(cohort, feats, clin)
    train_idx, val_idx = patient_split(data.labels, float(cfg["data"]["val_fraction"]), run.seed)
    part = np.array(["train"] * len(cohort), dtype=object)
    part[val_idx] = "val"
    table = cohort.table().assign(part=part)
    objective = fit_fold(run, cfg, data, train_idx, val_idx, cfg["model"]["aggregator"], clin, encoder,
                         tables={"patients.csv": table})
    assert run.dir is not None
    if not (run.dir / "val_metrics.json").exists():
        images = encoder if cfg["encoder"]["finetune"] else None  # a trained encoder embeds the cells anew
        val = predict(objective, dataset(data, val_idx, cfg, train=False, encoder=images), cfg, device)
        write_metrics({**mil_metrics(data.labels[val_idx], val.probability), "patients": len(val_idx)},
                      run.dir / "val_metrics.json", "validation patients")
        write_table(_prediction_frame(cohort.subset(val_idx), val), run.dir / "val_predictions.csv",
                    "validation patients: predictions")
    if folds:
        from leukolab.pipelines.mil_cv import cross_validate

        cross_validate(run, data, encoder)
    return run.dir


# ---------------------------------------------------------------------------------------------- applying a run
def load_mil_run(
    run: Path | str, allow_pickle: bool = False, device: torch.device | None = None
) -> tuple[MILObjective, Encoder, dict[str, Any]]:
    """The trained objective of a ``mil train`` run (``best.pt``), its encoder and config.

    The encoder is rebuilt from what the run names (``encoder.model``); an adapter run's frozen encoder
    must still hold the weights the adapter was trained on (same SHA-256), and gets the adapter hooked in.
    """
    state = load_run_state(run, "mil", "mil train")
    cfg = state["config"]
    e = state["encoder"]
    encoder = load_encoder(e["model"], e["img_size"], e["norm"], e["pool"], int(e["seed"]), allow_pickle)
    if encoder.dim != int(state["in_dim"]):
        raise LeukolabError(f"encoder {e['model']} now gives {encoder.dim}-d embeddings, the run was trained on "
                            f"{state['in_dim']}-d ones; expected the same encoder")
    agg = build_aggregator(state["aggregator"], int(state["in_dim"]), len(state["clinical_features"]),
                           **state["aggregator_options"])
    finetuned = bool(state.get("finetuned"))
    record = state.get("adapter") if isinstance(state.get("adapter"), dict) else None
    adapter = None
    if record:
        adapter = _restore_adapter(encoder, record, state.get("backbone"))
    objective = MILObjective(agg, encoder.model if finetuned else None, train_encoder=finetuned, pool=encoder.pool,
                             extras={k: state[k] for k in ("aggregator", "clinical_features")}, adapter=adapter,
                             encoder_init=record.get("init") if record else None)
    objective.load_state_dict(state["objective"])
    device = device or pick_device(cfg["train"].get("device", "auto"))
    return objective.to(device).eval(), encoder, {**cfg, "_state": {"clinical_features": state["clinical_features"],
                                                                    "finetuned": finetuned}}


def _restore_adapter(encoder: Encoder, record: dict[str, Any], stored: dict[str, torch.Tensor] | None) -> Adapter:
    """Hook a saved adapter into ``encoder.model`` (its stored frozen weights loaded first, when the run kept
    them), after checking that the encoder holds the weights the adapter was trained on."""
    from leukolab.models.adapters.state import weights_fingerprint

    if stored:
        encoder.model.load_state_dict(dict(stored))
    want = record.get("backbone_sha256")
    if want and weights_fingerprint(encoder.model.state_dict()) != want:
        raise LeukolabError(f"encoder {encoder.source} holds other weights than the run's {record['config']['name']} "
                            "adapter was trained on (SHA-256 differs); expected the unchanged encoder file")
    return load_adapter(encoder.model, record["config"], record.get("state"))


def _prediction_frame(cohort: Cohort, pred: Predictions) -> pd.DataFrame:
    labels = cohort.labels()
    frame = pd.DataFrame({
        "patient": cohort.ids,
        "label": [int(v) if v >= 0 else None for v in labels],
        "predicted": (pred.probability >= 0.5).astype(int),
        "probability": np.round(pred.probability, 6),
    })
    if np.isfinite(pred.gate).any():
        frame["image_gate"] = np.round(pred.gate, 4)
    return frame


def _apply(
    run: Path | str, data: Path | str, clinical: Path | str | None, out: Path | str | None, kind: str,
    require_labels: bool, gallery_k: int, allow_pickle: bool, progress: bool,
) -> tuple[Path, Cohort, Predictions]:
    run = Path(run)
    objective, encoder, cfg = load_mil_run(run, allow_pickle)
    cohort = read_cohort(data, clinical, reference_date(cfg), require_labels=require_labels)
    device = next(objective.parameters()).device
    enc = cfg["encoder"]
    if cfg["_state"]["finetuned"]:  # the run's own (trained or adapted) encoder embeds the images: nothing cached
        feats = [torch.zeros(len(p.cells), 0) for p in cohort.patients]
    else:
        cache = enc.get("cache") or run.parent / ".mil-cache"
        feats = embed_cohort(cohort, encoder, cache, int(enc["batch_size"]), device, progress)
    clin = tuple(cfg["_state"]["clinical_features"])
    bag = BagData.of(cohort, feats, clin)
    everyone = np.arange(len(cohort))
    ds = dataset(bag, everyone, cfg, train=False, encoder=encoder if cfg["_state"]["finetuned"] else None)
    pred = predict(objective, ds, cfg, device)
    out_dir = unique_child(run, f"{kind}-{Path(data).name}") if out is None else unique_child(Path(out).parent,
                                                                                             Path(out).name)
    write_table(_prediction_frame(cohort, pred), out_dir / "predictions.csv", "predictions, one row per patient")
    frames = [attention_frame(p.patient_id, p.cells, w) for p, w in zip(cohort.patients, pred.attention, strict=True)]
    write_table(pd.concat(frames, ignore_index=True), out_dir / "attention.csv",
                "attention: the weight of every cell (rank 1 = most attended)")
    for p, w, prob in zip(cohort.patients, pred.attention, pred.probability, strict=True):
        label = "unknown" if p.label is None else CLASS_NAMES[p.label]
        plot_attention_gallery(p.cells, w, out_dir / "attention" / f"{p.patient_id}.png",
                               f"{p.patient_id}: label {label}, P(tumoral) = {prob:.2f}", k=gallery_k)
    return out_dir, cohort, pred


def evaluate_mil(
    run: Path | str, data: Path | str, clinical: Path | str | None = None, out: Path | str | None = None,
    gallery_k: int = 8, allow_pickle: bool = False, progress: bool = True,
) -> Path:
    """Score a run on a labelled cohort; returns the new folder (``RUN/eval-<data>`` by default).

    Writes ``metrics.json`` (``balanced_accuracy``, ``accuracy``, ``roc_auc``,
    ``macro_f1``, confusion matrix ...), ``predictions.csv`` (patient, label,
    predicted, probability), ``attention.csv``, ``attention/<patient>.png``
    galleries, ``confusion_matrix.png`` and ``report.html``.
    """
    out_dir, cohort, pred = _apply(run, data, clinical, out, "eval", True, gallery_k, allow_pickle, progress)
    metrics = {**mil_metrics(cohort.labels(), pred.probability), "patients": len(cohort), "data": str(data),
               "run": str(Path(run).resolve())}
    write_metrics(metrics, out_dir / "metrics.json", "patient-level metrics")
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), list(CLASS_NAMES), out_dir / "confusion_matrix.png")
    write_report([out_dir], out_dir / "report.html", max_images=len(cohort) + 10, title=f"mil evaluate {out_dir.name}")
    return out_dir


def predict_mil(
    run: Path | str, data: Path | str, clinical: Path | str | None = None, out: Path | str | None = None,
    gallery_k: int = 8, allow_pickle: bool = False, progress: bool = True,
) -> Path:
    """Predict patients (labels not needed); returns the new folder (``RUN/predict-<data>`` by default) with
    ``predictions.csv``, ``attention.csv``, the galleries and ``report.html``."""
    out_dir, cohort, _ = _apply(run, data, clinical, out, "predict", False, gallery_k, allow_pickle, progress)
    write_report([out_dir], out_dir / "report.html", max_images=len(cohort) + 10, title=f"mil predict {out_dir.name}")
    return out_dir

