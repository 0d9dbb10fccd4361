"""``leukolab pretrain``: self-supervised MAE, DINO or auto-encoder pretraining on unlabelled image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app
from leukolab.errors import LeukolabError


@app.command()
def pretrain(
    data: Optional[list[Path]] = typer.Argument(None, help="One or more folders of images (read recursively)."),
    method: Optional[str] = typer.Option(None, "--method", help="mae, dino or ae (convolutional auto-encoder)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder; each run gets a new subfolder."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the defaults."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="timm name: a ViT for mae/dino (default vit_tiny_patch16), a CNN for ae (resnet18)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Input (MAE, AE) / global crop (DINO) size."),
    mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="MAE: share of patches masked, (0, 1)."),
    registers: Optional[int] = typer.Option(None, "--registers", help="ViT register tokens (timm reg_tokens)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", help="lr = base_lr * batch * accum / 256."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Share of the epochs warming up."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Held-out share for val_loss."),
    ignore_fraction: Optional[float] = typer.Option(
        None, "--ignore-fraction", help="Deterministic share of every folder left out."),
    check_images: Optional[bool] = typer.Option(None, "--check-images/--no-check-images"),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Per-epoch checkpoints to keep."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name prefix."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted pretrain run folder."),
) -> None:
    """Self-supervised pretraining (MAE, DINO or AE); writes config.yaml, history.csv, curves.png, best.pt, last.pt."""
    from leukolab.pipelines.pretrain import pretrain as run_pretrain

    paths = [str(Path(p).resolve()) for p in data] if data else None
    overrides = {
        "method": method, "data.paths": paths, "data.img_size": img_size, "data.batch_size": batch_size,
        "data.val_fraction": val_fraction, "data.ignore_fraction": ignore_fraction, "data.check_images": check_images,
        "model.backbone": backbone, "model.registers": registers, "mae.mask_ratio": mask_ratio,
        "optim.base_lr": base_lr, "optim.weight_decay": weight_decay, "optim.warmup_ratio": warmup_ratio,
        "optim.grad_accum": grad_accum, "train.epochs": epochs, "train.keep_last": keep_last, "train.device": device,
        "seed": seed,
    }
    if resume is None and not data and config is None:
        raise LeukolabError("no DATA given; expected one or more folders of unlabelled images")
    run_dir = run_pretrain(out, config, overrides, resume=resume, name=name)
    typer.echo(f"run folder: {run_dir}")
