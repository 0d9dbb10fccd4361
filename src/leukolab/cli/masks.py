"""``leukolab masks``: a cell mask per image (classical segmentation), scored against reference masks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app


@app.command()
def masks(
    data: Path = typer.Argument(..., help="Folder of class folders, folder with train/val/test, CSV with a path "
                                "column, or a folder of images."),
    out: Path = typer.Option(..., "--out", help="New folder for the masks (PNG, 0/255, DATA's layout), masks.csv "
                             "and iou.csv."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of reference masks to score against "
                                             "(default: a masks/ folder beside DATA's class folders, if any)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only a random sample of this many images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Estimate the white cell's mask in every image (nucleus + cytoplasm by colour, morphology, centre component)."""
    from leukolab.pipelines.masks import MaskOptions, estimate_masks

    result = estimate_masks(data, out, MaskOptions(reference=reference, limit=limit, seed=seed, progress=progress))
    for line in result.lines():
        typer.echo(line)
