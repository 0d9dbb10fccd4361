"""``leukolab train | evaluate | predict | stats``: the image classifier."""

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
    app,
)
from leukolab.errors import LeukolabError

TTA_HELP = ("Average the probabilities over the 8 flips/90-degree rotations (default: an ensemble's own "
            "setting, off for a run).")


@app.command()
def train(
    data: Optional[Path] = typer.Argument(None, help="ImageFolder tree, folder with train/val/test, or CSV."),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder; each run gets a new subfolder."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the defaults (and the preset)."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Packaged preset name (e.g. pbc-best) or a YAML file: merged over the defaults, "
        "under --config and options."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="timm name, e.g. vit_tiny_patch16, resnet18."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay",
                                                help="Layer-wise lr decay over a ViT backbone, (0, 1]; 1 = off."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    label_fraction: Optional[float] = typer.Option(None, "--label-fraction", help="Share of training labels, (0, 1]."),
    min_samples_per_epoch: Optional[int] = typer.Option(
        None, "--min-samples-per-epoch", help="Repeat a small labelled set up to this many samples per epoch."),
    init: Optional[Path] = typer.Option(None, "--init", help="Local checkpoint to initialise the backbone."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP + " For --init."),
    head: Optional[str] = typer.Option(None, "--head", help="linear or mlp."),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--train-backbone",
                                                   help="Linear probe on frozen features."),
    fuse: Optional[list[Path]] = typer.Option(
        None, "--fuse", help="Fusion: a frozen encoder (run folder, pretraining run or converted checkpoint); repeat "
        "for several. Their pooled features, each from the image at its own size and normalisation, are "
        "concatenated under a trainable head."),
    fuse_head: Optional[str] = typer.Option(None, "--fuse-head", help="Head of --fuse: linear or mlp (= --head)."),
    fuse_norm: Optional[str] = typer.Option(
        None, "--fuse-norm", help="Per-encoder feature normalisation of --fuse: none, l2 or layernorm (default)."),
    augment: Optional[bool] = typer.Option(
        None, "--augment/--no-augment", help="Random crops, flips, rotations, colour jitter of training images "
        "(default on; off with --fuse, whose features are then computed once)."),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="Freeze the ViT backbone and train an adapter + the head: lora, prompt, bottleneck "
        "or adaptformer (options: 'adapter:' section of --config)."),
    lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    prompt_tokens: PromptTokens = None,
    prompt_deep: PromptDeep = None,
    class_weights: Optional[bool] = typer.Option(None, "--class-weights/--no-class-weights"),
    balance: Optional[str] = typer.Option(
        None, "--balance", help="Class balancing: none, weights (= --class-weights), oversample (class-balanced "
        "sampler) or augment (augmented copies of rare classes up to the majority count, in RUN/balanced/)."),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="MixUp alpha of training batches, e.g. 0.2 (0 = off)."),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="CutMix alpha of training batches, e.g. 1 (0 off)."),
    mix_prob: Optional[float] = typer.Option(None, "--mix-prob", help="Probability that a batch is mixed (default 1)."),
    masks: Optional[Path] = typer.Option(
        None, "--masks", help="Folder of cell masks named like the images (default: a masks/ folder beside the "
        "class folders when present; else masks are estimated)."),
    crop: Optional[str] = typer.Option(
        None, "--crop", help="none or cell: crop each image to its cell's mask box + --crop-margin (train, evaluate "
        "and predict alike)."),
    crop_margin: Optional[float] = typer.Option(
        None, "--crop-margin", help="Fraction of the cell box side added on each side of a cell crop (default 0.15)."),
    stain_aug: Optional[float] = typer.Option(
        None, "--stain-aug", help="Probability of a stain jitter in optical density (HED) per training image."),
    degrade: Optional[float] = typer.Option(
        None, "--degrade", help="Probability of a blur / down-up scaling per training image."),
    stain_norm: Optional[str] = typer.Option(
        None, "--stain-norm", help="none, reinhard or macenko: colours mapped to a reference at train and test time."),
    stain_ref: Optional[Path] = typer.Option(
        None, "--stain-ref", help="Reference image or folder for --stain-norm (default: the training images)."),
    mask_aug: Optional[float] = typer.Option(
        None, "--mask-aug", help="Probability of pasting a training image's cell (by its mask) onto a new background."),
    mask_bg: Optional[str] = typer.Option(
        None, "--mask-bg", help="Background of --mask-aug: other (another image's), plain, synthetic (red cells), "
        "removed (flat fill) or mixed."),
    background: Optional[Path] = typer.Option(
        None, "--background", help="Folder of background crops (recursive), added as class 'background'."),
    folds_file: Optional[Path] = typer.Option(
        None, "--folds-file", help="path,label,fold CSV (leukolab split); DATA may then be left out."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Validation fold K of --folds-file; the others train."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Per-epoch checkpoints to keep."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
    check_images: Optional[bool] = typer.Option(None, "--check-images/--no-check-images"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name prefix."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
) -> None:
    """Train a WBC classifier; writes config.yaml, history.csv, best.pt, last.pt into a new run folder."""
    from leukolab.config import preset_label
    from leukolab.pipelines.classify import train_classifier

    adapter_options = AdapterOptions(lora_rank, lora_alpha, lora_targets, prompt_tokens, prompt_deep)
    overrides = {
        "data.path": str(data) if data is not None else None, "data.img_size": img_size,
        "data.label_fraction": label_fraction, "data.batch_size": batch_size, "data.check_images": check_images,
        "data.min_samples_per_epoch": min_samples_per_epoch, "data.balance": balance,
        "model.backbone": backbone, "model.init": str(init) if init is not None else None, "model.head": head,
        "model.freeze_backbone": freeze_backbone, "optim.lr": lr, "optim.weight_decay": weight_decay,
        "optim.layer_decay": layer_decay,
        "optim.grad_accum": grad_accum, "optim.class_weights": class_weights, "train.epochs": epochs,
        "train.device": device, "train.keep_last": keep_last, "seed": seed, "adapter.name": adapter,
        **adapter_options.overrides("adapter"),
        "mix.mixup": mixup, "mix.cutmix": cutmix, "mix.prob": mix_prob, "data.fold": fold,
        "data.background": str(background) if background is not None else None,
        "data.masks": str(masks) if masks is not None else None, "data.crop": crop, "data.crop_margin": crop_margin,
        "data.stain_aug": stain_aug, "data.degrade": degrade, "data.stain_norm": stain_norm,
        "data.stain_ref": str(stain_ref) if stain_ref is not None else None, "data.mask_aug": mask_aug,
        "data.mask_bg": mask_bg,
        "data.folds_file": str(folds_file) if folds_file is not None else None,
        "preset": preset_label(preset) if preset is not None else None,
        "data.augment": augment if augment is not None or not fuse else False,
        "model.fuse": [str(p) for p in fuse] if fuse else None, "model.fuse_norm": fuse_norm,
    }
    if fuse_head is not None:
        if head is not None and head != fuse_head:
            raise LeukolabError(f"--head {head} and --fuse-head {fuse_head} disagree; expected one of them")
        overrides["model.head"] = fuse_head
    for option, value in (("--fuse-head", fuse_head), ("--fuse-norm", fuse_norm)):
        if value is not None and not fuse and resume is None:
            raise LeukolabError(f"{option} applies to a fusion run; expected --fuse RUN (one or more)")
    if fuse:
        for option, value in (("--backbone", backbone), ("--init", init), ("--adapter", adapter),
                              ("--img-size", img_size)):
            if value is not None:
                raise LeukolabError(f"{option} and --fuse: a fusion run's backbone is its frozen --fuse encoders, "
                                    "each fed at its own input size; expected one of them")
        if freeze_backbone is False:
            raise LeukolabError("--train-backbone and --fuse: fusion encoders stay frozen; expected one of them")
    adapter_options.check(adapter, require_adapter=config is None and preset is None and resume is None)
    if resume is not None:
        overrides["data.path"] = None if data is None else str(Path(data).resolve())
        for key, path in (("data.background", background), ("data.folds_file", folds_file), ("data.masks", masks),
                          ("data.stain_ref", stain_ref)):
            overrides[key] = None if path is None else str(path.resolve())
        overrides["model.fuse"] = [str(p.resolve()) for p in fuse] if fuse else None
    elif data is None and config is None and folds_file is None:
        raise LeukolabError("no DATA given; expected a folder of class folders or a path,label CSV")
    spec = _ensemble_spec(preset, config) if resume is None else None
    if spec is not None:  # an ensemble preset: one run per member, then the ensemble folder
        from leukolab.config import resolve
        from leukolab.pipelines.ensemble import ensemble_summary
        from leukolab.pipelines.ensemble_train import train_ensemble_preset

        show = bool(resolve("train", config, overrides)["train"]["progress"])
        folder = train_ensemble_preset(out, spec, config, overrides, name, allow_pickle, progress=show)
        typer.echo(ensemble_summary(folder))
        typer.echo(f"ensemble folder: {folder} (evaluate, predict and smear analyse take it like a run)")
        return
    run_dir = train_classifier(out, config, overrides, resume=resume, name=name, allow_pickle=allow_pickle)
    typer.echo(f"run folder: {run_dir}")


def _ensemble_spec(preset: Optional[str], config: Optional[Path]) -> Optional[dict]:
    """The ``ensemble:`` section of the preset named by ``--preset`` or the ``--config`` file (None: one run)."""
    from leukolab.config import ensemble_preset, read_yaml

    chosen = preset or (read_yaml(config).get("preset") if config is not None else None)
    return ensemble_preset(chosen) if chosen else None


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A leukolab train run folder, or an ensemble folder (leukolab ensemble fit)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled test data (default: the run's test split)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default RUN/eval, RUN/eval-2 ...)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help=TTA_HELP),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="Image-decoding processes."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Metrics, predictions CSV, confusion matrix (and curves of a run) of a trained run or an ensemble."""
    from leukolab.pipelines.classify import evaluate_run, metrics_summary

    out_dir = evaluate_run(run, data, out, batch_size=batch_size, check_images=check_images, show_progress=progress,
                           tta=tta, num_workers=workers)
    typer.echo(metrics_summary(out_dir / "metrics.json"))
    written = ["metrics.json", "predictions.csv", "confusion_matrix.png"]
    typer.echo(f"wrote {out_dir}/{', '.join(written + (['curves.png'] if (out_dir / 'curves.png').is_file() else []))}")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A leukolab train run folder, or an ensemble folder (leukolab ensemble fit)."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the table to this CSV (new file)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help=TTA_HELP),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="Image-decoding processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Predicted class and probabilities of each image (under torchrun: each process a shard, rank 0 writes)."""
    from leukolab.pipelines.classify import predict_images
    from leukolab.utils.files import write_text

    if out is not None and out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    table = predict_images(run, list(images), batch_size=batch_size, tta=tta, show_progress=progress,
                           num_workers=workers)
    if table is None:  # another torchrun rank than 0: rank 0 writes
        return
    if out is not None:
        write_text(out, table.to_csv(index=False))
        typer.echo(f"wrote {out}")
    else:
        typer.echo(table.to_csv(index=False, float_format="%.4f"), nl=False)


@app.command()
def stats(
    data: Path = typer.Argument(..., help="ImageFolder tree, folder with splits, or CSV."),
    fractions: str = typer.Option("0.5,0.1,0.01", "--fractions", help="Comma-separated label fractions."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Per-class counts: train / val / test and each label-fraction subset (boxes for a detection folder)."""
    from leukolab.pipelines.detect import is_detection_layout

    if is_detection_layout(data):  # VOC / COCO / YOLO boxes: per-class box counts and sizes
        from leukolab.cli.detect import stats as detection_stats

        return detection_stats(data)
    from leukolab.pipelines.classify import dataset_stats

    try:
        fr = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise LeukolabError(f"--fractions {fractions!r}: expected numbers like 0.5,0.1,0.01") from None
    typer.echo(dataset_stats(data, fr, seed).to_string())
