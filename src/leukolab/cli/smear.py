"""``leukolab smear analyse | mine-background | crops``: from smear fields to a differential count."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import add_group

smear_app = add_group("smear", "From smear fields to a differential count: detect, crop, classify, count.")

_MARGIN_HELP = ("Fraction of the box side added on each side of a crop (0.5: crop side = 2 x box side, the cell "
                "half the crop as in PBC/CellaVision crops).")
_PAD_HELP = "Where a crop leaves the field: reflect (mirror the field at its border) or median (its median colour)."
_CELL_HELP = "Detector class to classify (default: the detector's only class, or its wbc / white cell class)."


@smear_app.command("analyse")
def analyse(
    images: list[Path] = typer.Argument(..., help="Field images and/or folders of them."),
    detector: Path = typer.Option(..., "--detector", help="A leukolab detect train run."),
    classifier: list[Path] = typer.Option(..., "--classifier", help="A leukolab train run or an ensemble folder; "
                                          "repeat to average several with equal weights."),
    out: Path = typer.Option(..., "--out", help="New folder to write."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Average the classifiers over the 8 dihedral views."),
    score: float = typer.Option(0.3, "--score", help="Detector score threshold of the white-cell class."),
    margin: float = typer.Option(0.5, "--margin", help=_MARGIN_HELP),
    pad: str = typer.Option("reflect", "--pad", help=_PAD_HELP),
    tile: bool = typer.Option(False, "--tile/--no-tile", help="Tile fields larger than the detector's fields."),
    cell_class: Optional[str] = typer.Option(None, "--cell-class", help=_CELL_HELP),
    truth: Optional[Path] = typer.Option(None, "--truth", help="CSV of annotated white cells (BCCD wbc_types.csv or "
                                         "synth smears boxes.csv): writes truth.json with recall and accuracy."),
    batch_size: int = typer.Option(64, "--batch-size", help="Crops per classifier batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    draw: bool = typer.Option(True, "--draw/--no-draw", help="Write annotated/<image>.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Detect white cells, classify each crop, count: cells.csv, differential.csv/.png, annotated/, summary.json."""
    from leukolab.pipelines.smear import SmearOptions, analyse_smears

    options = SmearOptions(score=score, margin=margin, pad=pad, tile=tile, cell_class=cell_class, tta=tta,
                           batch_size=batch_size, device=device, draw=draw, progress=progress)
    folder = analyse_smears(list(images), detector, list(classifier), out, options, truth)
    if folder is not None:  # rank 0 (or the only process)
        typer.echo(f"wrote {folder}/cells.csv, differential.csv, differential.png, summary.json"
                   + (", annotated/" if draw else "") + (", truth.json" if truth is not None else ""))


@smear_app.command("mine-background")
def mine_background(
    data: Path = typer.Argument(..., help="VOC, COCO or YOLO detection folder with annotated white cells."),
    detector: Path = typer.Option(..., "--detector", help="A leukolab detect train run."),
    out: Path = typer.Option(..., "--out", help="New folder of background crops."),
    per_field: int = typer.Option(4, "--per-field", help="Crops per field at most: half false detections, the "
                                  "rest random squares clear of white cells."),
    seed: int = typer.Option(0, "--seed"),
    score: float = typer.Option(0.05, "--score", help="Detector score threshold (any class)."),
    margin: float = typer.Option(0.5, "--margin", help=_MARGIN_HELP),
    pad: str = typer.Option("reflect", "--pad", help=_PAD_HELP),
    cell_class: Optional[str] = typer.Option(None, "--cell-class", help="The data's white-cell class (default: its "
                                             "only class, or its wbc / white cell class)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Background crops (false detections, random squares away from white cells) for train --background DIR."""
    from leukolab.pipelines.smear_background import mine_background as mine

    folder = mine(data, detector, out, per_field, seed, score, margin, pad, cell_class, progress)
    typer.echo(f"wrote {folder} (crops.csv lists where each crop came from)")


@smear_app.command("crops")
def crops(
    data: Path = typer.Argument(..., help="Folder of the annotated field images (searched recursively by file name)."),
    truth: Path = typer.Option(..., "--truth", help="CSV of annotated white cells: BCCD wbc_types.csv or synth "
                               "smears boxes.csv."),
    out: Path = typer.Option(..., "--out", help="New folder to write: OUT/<type>/<image>_<idx>.png + crops.csv."),
    margin: float = typer.Option(0.25, "--margin", help="Fraction of the box side added on each side of a crop."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The typed white cells of annotated fields as an ImageFolder test set (untyped boxes are skipped)."""
    from leukolab.pipelines.smear_crops import write_smear_crops

    res = write_smear_crops(data, truth, out, margin, progress)
    counts = ", ".join(f"{k} {v}" for k, v in res.counts.items())
    typer.echo(f"wrote {res.folder}: {sum(res.counts.values())} crops ({counts}); skipped {res.untyped} untyped "
               f"boxes" + (f" and {res.missing_images} images not under {data}" if res.missing_images else ""))
