"""``leukolab dedup | split``: duplicate images and cross-validation folds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app

#: the default near-duplicate threshold (bits of the 256-bit hash); kept equal to leukolab.data.dedup's,
#: written out here so that ``--help`` does not import the data layer
DEFAULT_THRESHOLD = 44
DATA_HELP = "Folder of class folders, folder with train/val/test, CSV with a path column, or a folder of images."


@app.command()
def dedup(
    data: Path = typer.Argument(..., help=DATA_HELP),
    across: Optional[Path] = typer.Option(None, "--across", help="A second set (e.g. the test split): report "
                                          "images of DATA that also appear in it (train/test leakage)."),
    threshold: int = typer.Option(DEFAULT_THRESHOLD, "--threshold",
                                  help="Near duplicate: at most this many of the 256 hash bits differ."),
    out: Optional[Path] = typer.Option(None, "--out", help="Clusters CSV to write (new file; default dedup.csv, "
                                       "dedup-2.csv ... in the current folder)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Exact (identical files) and near-duplicate images (perceptual hash, any flip or rotation); clusters CSV."""
    from leukolab.pipelines.datatools import dedup as run_dedup

    report = run_dedup(data, across, threshold, out, progress=progress)
    for line in report.lines():
        typer.echo(line)


@app.command()
def split(
    data: Path = typer.Argument(..., help=DATA_HELP + " A train/val/test folder is folded over its train split."),
    folds: int = typer.Option(..., "--folds", help="Number of folds K (>= 2)."),
    out: Path = typer.Option(..., "--out", help="Folds CSV to write (new file)."),
    seed: int = typer.Option(0, "--seed"),
    multilabel: bool = typer.Option(False, "--multilabel",
                                    help="DATA is a CSV with a 'labels' column ('a;b'): iterative stratification."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="CSV column whose images stay in one fold "
                                           "(e.g. patient), or 'duplicates' (near-duplicate clusters)."),
    dedup_threshold: int = typer.Option(DEFAULT_THRESHOLD, "--dedup-threshold",
                                        help="Near-duplicate threshold in bits for --group-by duplicates."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Stratified (multilabel: iteratively stratified) K-fold column, groups kept together; writes a folds CSV."""
    from leukolab.pipelines.datatools import SplitOptions, split_folds

    options = SplitOptions(folds=folds, seed=seed, multilabel=multilabel, group_by=group_by,
                           dedup_threshold=dedup_threshold, progress=progress)
    result = split_folds(data, out, options)
    for note in result.notes:
        typer.echo(note)
    typer.echo(result.summary.to_string())
    typer.echo(f"wrote {result.out}")
