"""``leukolab experiment label-efficiency``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import add_group
from leukolab.errors import LeukolabError

experiment_app = add_group("experiment", "Multi-run experiments.")


def parse_pretrained(items: list[str]) -> dict[str, str]:
    """``["mae=runs/a", "dino=runs/b"]`` -> ``{"mae": "runs/a", "dino": "runs/b"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LeukolabError(f"--pretrained {item!r}: expected NAME=PATH, e.g. mae=runs/mae-run")
        if name in out:
            raise LeukolabError(f"--pretrained name {name!r} is given twice")
        out[name] = path
    return out


DEFAULT_MIN_SAMPLES = 512


@experiment_app.command("label-efficiency")
def label_efficiency(
    data: Path = typer.Argument(..., help="Labelled data (ImageFolder tree, split folders or CSV)."),
    out: Path = typer.Option(..., "--out", help="Experiment folder; an existing one with the same setup resumes."),
    pretrained: list[str] = typer.Option([], "--pretrained", help="NAME=RUN_OR_CKPT, repeatable."),
    fractions: str = typer.Option("1,0.5,0.1,0.01", "--fractions"),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds per cell (0 .. seeds-1)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Default: the pretrained runs' backbone."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate."),
    linear_lr: float = typer.Option(1e-2, "--linear-lr", help="Linear-probe learning rate."),
    linear_probe: bool = typer.Option(True, "--linear-probe/--no-linear-probe"),
    finetune_layer_decay: float = typer.Option(
        1.0, "--finetune-layer-decay",
        help="Layer-wise lr decay when fine-tuning a pretrained ViT (MAE recipe, e.g. 0.75); 1 = off. "
             "Scratch runs never use it."),
    min_samples_per_epoch: Optional[int] = typer.Option(
        None, "--min-samples-per-epoch",
        help="Small label fractions repeat their images up to this many samples per epoch "
             f"(default {DEFAULT_MIN_SAMPLES}; 0 = off)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of train options for every cell."),
) -> None:
    """From scratch vs each pretrained init, fine-tune and linear probe, at each label fraction and seed."""
    from leukolab.config import read_yaml
    from leukolab.pipelines.experiment import run_label_efficiency

    try:
        fr = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError:
        raise LeukolabError(f"--fractions {fractions!r}: expected numbers like 1,0.5,0.1,0.01") from None
    overrides: dict[str, object] = {}
    if config is not None:
        flat = read_yaml(config)
        for section, values in flat.items():
            if isinstance(values, dict):
                overrides.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                overrides[section] = values
    overrides.setdefault("data.min_samples_per_epoch", DEFAULT_MIN_SAMPLES)
    for key, value in (("model.backbone", backbone), ("data.img_size", img_size), ("train.epochs", epochs),
                       ("data.batch_size", batch_size), ("optim.lr", lr),
                       ("data.min_samples_per_epoch", min_samples_per_epoch)):
        if value is not None:
            overrides[key] = value
    result = run_label_efficiency(data, out, parse_pretrained(pretrained), fr, seeds, overrides,
                                  linear_probe=linear_probe, linear_lr=linear_lr, log=typer.echo,
                                  finetune_layer_decay=finetune_layer_decay)
    typer.echo((result / "label_efficiency.md").read_text())
    typer.echo(f"wrote {result}/label_efficiency.csv, label_efficiency.md, label_efficiency.png")
