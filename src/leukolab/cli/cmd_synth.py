"""``leukolab synth wbc|pool``: write procedural synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer

from leukolab.cli.app import synth_app


@synth_app.command("wbc")
def synth_wbc(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    n_per_class: int = typer.Option(200, "--n-per-class", help="Images per class."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed"),
    difficulty: float = typer.Option(0.5, "--difficulty", help="0 = easy ... 1 = hard."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Synthetic WBC crops: one folder per class, masks/ and metadata.csv."""
    from leukolab.data.synthetic import make_wbc_dataset

    path = make_wbc_dataset(out, n_per_class, size=size, seed=seed, difficulty=difficulty, progress=progress)
    typer.echo(f"wrote {path}")


@synth_app.command("pool")
def synth_pool(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    n: int = typer.Option(2000, "--n", help="Number of unlabelled images."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed"),
    tissue_fraction: float = typer.Option(0.3, "--tissue-fraction", help="Share of off-domain tissue patches."),
    difficulty: float = typer.Option(0.5, "--difficulty"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """An unlabelled pretraining pool: WBC crops mixed with tissue-like patches."""
    from leukolab.data.synthetic import make_pool

    path = make_pool(out, n, size=size, seed=seed, tissue_fraction=tissue_fraction, difficulty=difficulty,
                     progress=progress)
    typer.echo(f"wrote {path}")
