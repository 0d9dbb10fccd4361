"""``leukolab adapt``: a classifier run adapted to another lab's unlabelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app


@app.command("adapt")
def adapt(
    run: Path = typer.Argument(..., help="A leukolab train run (a CNN: its BatchNorm statistics are replaced)."),
    images: list[Path] = typer.Argument(..., help="The new lab's cell images (files and/or folders, recursive); "
                                        "no labels are read."),
    out: Path = typer.Option(..., "--out", help="New run folder to write (never overwritten)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch-statistics step."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most this many images (a seeded "
                                             "random subset)."),
    seed: int = typer.Option(0, "--seed", help="Order (and subset) of the images."),
    device: str = typer.Option("auto", "--device"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Recompute a run's BatchNorm statistics on another lab's unlabelled images (AdaBN); writes a new run folder
    that evaluate, predict, embed, ensemble fit and smear analyse take like any run."""
    from leukolab.pipelines.adapt import adapt_run

    folder = adapt_run(run, images, out, batch_size=batch_size, seed=seed, max_images=max_images, device=device,
                       progress=progress)
    import yaml

    record = yaml.safe_load((folder / "config.yaml").read_text())["adapt"]
    note = (f"; no cell found in {record['whole_image_fallbacks']} (used whole, --crop cell)"
            if record["whole_image_fallbacks"] else "")
    typer.echo(f"adapted the BatchNorm statistics of {run} on {record['images']} image(s){note}")
    typer.echo(f"wrote {folder} (evaluate, predict and smear analyse take it like any run)")
