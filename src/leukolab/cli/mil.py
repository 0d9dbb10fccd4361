"""``leukolab mil train | evaluate | predict`` (patient-level diagnosis) and ``leukolab synth patients``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import (
    ALLOW_PICKLE_HELP,
    AdapterOptions,
    LoraAlpha,
    LoraRank,
    LoraTargets,
    PromptDeep,
    PromptTokens,
    add_group,
)
from leukolab.cli.synth import synth_app
from leukolab.errors import LeukolabError

mil_app = add_group("mil", "Patient-level diagnosis: multiple-instance learning over cells + clinical data.")

ENCODER_HELP = ("Cell encoder: a leukolab run folder or checkpoint, a converted/raw ViT file, a timm name "
                "(random init: the floor), or 'morphology' (hand-crafted nucleus / cytoplasm features, no weights).")


def _path(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p.resolve())


@mil_app.command("train")
def mil_train(
    bags: Optional[Path] = typer.Argument(None, help="One folder of cell images per patient."),
    clinical: Optional[Path] = typer.Option(None, "--clinical",
                                            help="Clinical CSV (default BAGS/clinical_annotation.csv)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help=ENCODER_HELP),
    aggregator: Optional[str] = typer.Option(None, "--aggregator",
                                             help="mean, max, abmil, transformer, xattn, moe or clinical."),
    clinical_features: Optional[str] = typer.Option(
        None, "--clinical-features", help="Comma-separated: age,lymph_count,gender (or 'none' for image only)."),
    reference_date: Optional[str] = typer.Option(None, "--reference-date",
                                                 help="Ages are counted at this date (default 2020-01-01)."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Also cross-validate by patient with this many folds."),
    repeats: Optional[int] = typer.Option(None, "--repeats",
                                          help="Repeat the cross-validation (seeds seed, seed+1 ...)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Comma-separated aggregators of the CV table."),
    finetune_encoder: Optional[bool] = typer.Option(
        None, "--finetune-encoder/--frozen-encoder", help="Train the encoder end to end on sampled cells (slow)."),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="With --finetune-encoder and a ViT encoder: keep it frozen and train an adapter + "
        "the aggregator: lora, prompt, bottleneck or adaptformer (options: encoder.adapter_kwargs of --config)."),
    lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    prompt_tokens: PromptTokens = None,
    prompt_deep: PromptDeep = None,
    cells_per_bag: Optional[int] = typer.Option(None, "--cells-per-bag",
                                                help="Fine-tuning: cells drawn per bag and step (default 16)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Encoder input size (default: the encoder's)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Bags per step."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the defaults."),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder; each run gets a new subfolder."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP + " For --encoder."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
) -> None:
    """Train a patient-level model on cached cell embeddings (and cross-validate with --folds)."""
    from leukolab.pipelines.mil import train_mil

    adapter_options = AdapterOptions(lora_rank, lora_alpha, lora_targets, prompt_tokens, prompt_deep)
    overrides = {
        "data.bags": _path(bags), "data.clinical": _path(clinical), "data.batch_size": batch_size,
        "data.reference_date": reference_date,
        "encoder.model": _path(Path(encoder)) if encoder and Path(encoder).exists() else encoder,
        "encoder.img_size": img_size, "encoder.finetune": finetune_encoder, "encoder.adapter": adapter,
        "encoder.cells_per_bag": cells_per_bag,
        **adapter_options.overrides("encoder.adapter_kwargs"),
        "model.aggregator": aggregator,
        "model.clinical_features": None if clinical_features is None else [
            f for f in clinical_features.split(",") if f.strip() and f.strip().lower() != "none"],
        "cv.folds": folds, "cv.repeats": repeats,
        "cv.compare": None if compare is None else [c.strip() for c in compare.split(",") if c.strip()],
        "optim.lr": lr, "train.epochs": epochs, "train.device": device, "train.progress": progress, "seed": seed,
    }
    if resume is None and bags is None and config is None:
        raise LeukolabError("no BAGS given; expected one folder of cell images per patient")
    adapter_options.check(adapter, require_adapter=config is None and resume is None,  # else silently unused
                          hint="--finetune-encoder ")
    if cells_per_bag is not None and not finetune_encoder and config is None and resume is None:
        raise LeukolabError(f"--cells-per-bag {cells_per_bag} applies to fine-tuning; expected it with "
                            "--finetune-encoder (without it the aggregator trains on cached embeddings)")
    run_dir = train_mil(out, config, overrides, resume=resume, allow_pickle=allow_pickle)
    typer.echo(f"run folder: {run_dir}")
    table = run_dir / "cv_table.md"
    if table.is_file():
        typer.echo(table.read_text(encoding="utf-8"))


@mil_app.command("evaluate")
def mil_evaluate(
    run: Path = typer.Argument(..., help="A leukolab mil train run folder."),
    data: Path = typer.Option(..., "--data", help="Labelled patients: one folder of cell images each."),
    clinical: Optional[Path] = typer.Option(None, "--clinical",
                                            help="Clinical CSV (default DATA/clinical_annotation.csv)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default RUN/eval-<DATA>)."),
    gallery: int = typer.Option(8, "--gallery", help="Most / least attended cells shown per patient."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP + " For the encoder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """metrics.json, predictions.csv, attention.csv, attention galleries and report.html of a run on DATA."""
    import json

    from leukolab.pipelines.mil import evaluate_mil

    out_dir = evaluate_mil(run, data, clinical, out, gallery, allow_pickle, progress)
    m = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    typer.echo(f"balanced accuracy {m['balanced_accuracy']:.3f}  accuracy {m['accuracy']:.3f}  "
               f"ROC AUC {m['roc_auc']:.3f}  macro F1 {m['macro_f1']:.3f}  ({m['patients']} patients)")
    typer.echo(f"wrote {out_dir}")


@mil_app.command("predict")
def mil_predict(
    run: Path = typer.Argument(..., help="A leukolab mil train run folder."),
    data: Path = typer.Option(..., "--data", help="Patients to predict: one folder of cell images each."),
    clinical: Optional[Path] = typer.Option(None, "--clinical", help="Clinical CSV (LABEL may be absent or empty)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default RUN/predict-<DATA>)."),
    gallery: int = typer.Option(8, "--gallery", help="Most / least attended cells shown per patient."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP + " For the encoder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """predictions.csv (patient, predicted, probability), attention.csv, galleries and report.html."""
    from leukolab.pipelines.mil import predict_mil

    out_dir = predict_mil(run, data, clinical, out, gallery, allow_pickle, progress)
    typer.echo(f"wrote {out_dir}")


@synth_app.command("patients")
def synth_patients(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    n_patients: int = typer.Option(60, "--n-patients", help="Number of patients."),
    cells_min: int = typer.Option(16, "--cells-min", help="Fewest cells in a bag."),
    cells_max: int = typer.Option(200, "--cells-max", help="Most cells in a bag."),
    size: int = typer.Option(64, "--size", help="Crop side in pixels."),
    tumoral_fraction: float = typer.Option(0.7, "--tumoral-fraction", help="Share of tumoral patients."),
    difficulty: float = typer.Option(0.3, "--difficulty", help="Nuisance level of the crops, 0 ... 1."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Synthetic lymphocytosis patients: OUT/<patient>/*.png and OUT/clinical_annotation.csv."""
    from leukolab.pipelines.mil import PatientOptions
    from leukolab.pipelines.mil import synth_patients as write

    options = PatientOptions(n_patients, cells_min, cells_max, size, seed, tumoral_fraction, difficulty)
    typer.echo(f"wrote {write(out, options, progress)}")
