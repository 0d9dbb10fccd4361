"""``leukolab synth wbc | pool | tissue``: write procedural synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer

from leukolab.cli.app import add_group

synth_app = add_group("synth", "Write procedural synthetic data sets.")


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
    from leukolab.pipelines import synth

    options = synth.SynthOptions(size=size, seed=seed, difficulty=difficulty, progress=progress)
    path = synth.synth_wbc(out, n_per_class, options)
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
    from leukolab.pipelines import synth

    options = synth.SynthOptions(size=size, seed=seed, difficulty=difficulty, progress=progress)
    path = synth.synth_pool(out, n, tissue_fraction, options)
    typer.echo(f"wrote {path}")


@synth_app.command("tissue")
def synth_tissue(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    n: int = typer.Option(400, "--n", help="Number of images in all, half normal and half tumour."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed"),
    difficulty: float = typer.Option(0.5, "--difficulty", help="Class overlap: 0 = easy ... 1 = hard."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """A labelled tissue-like set: normal/ and tumour/ patches (a Camelyon16 stand-in) and metadata.csv."""
    from leukolab.pipelines import synth

    options = synth.SynthOptions(size=size, seed=seed, difficulty=difficulty, progress=progress)
    path = synth.synth_tissue(out, n, options)
    typer.echo(f"wrote {path}")
