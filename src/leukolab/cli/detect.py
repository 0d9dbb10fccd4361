"""``leukolab detect train | evaluate | predict | export | stats``, ``leukolab synth smears``: smear fields."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import add_group
from leukolab.cli.synth import synth_app
from leukolab.errors import LeukolabError

BACKEND_HELP = "torch, or onnx: ONNX Runtime on the CPU (pip install 'leukolab[onnx]')."
TTA_HELP = "Average the four flips of every field (centernet runs; 4x the network time)."

detect_app = add_group("detect", "Find white cells, red cells and platelets in smear fields (boxes).")


def _class_scores(values: list[str] | None) -> dict[str, float] | None:
    if not values:
        return None
    out = {}
    for v in values:
        name, sep, number = v.rpartition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(number)
        except ValueError:
            raise LeukolabError(f"--class-score {v!r}: expected CLASS=SCORE, e.g. wbc=0.5") from None
    return out


@synth_app.command("smears")
def synth_smears(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    n: int = typer.Option(200, "--n", help="Number of fields."),
    width: int = typer.Option(640, "--width"),
    height: int = typer.Option(480, "--height"),
    seed: int = typer.Option(0, "--seed"),
    difficulty: float = typer.Option(0.5, "--difficulty", help="0 = easy ... 1 = hard."),
    scale: float = typer.Option(1.0, "--scale", help="Cell size multiplier (1: red cells ~92 px across)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Smear fields with boxes (WBC of known type, RBC, platelets) in VOC, COCO and YOLO form, plus boxes.csv."""
    from leukolab.pipelines.detect import synth_smears as make

    path = make(out, n, width=width, height=height, seed=seed, difficulty=difficulty, scale=scale, progress=progress)
    typer.echo(f"wrote {path}")


@detect_app.command("train")
def train(
    data: Optional[Path] = typer.Argument(None, help="VOC, COCO or YOLO detection folder."),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder; each run gets a new subfolder."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the defaults."),
    detector: Optional[str] = typer.Option(None, "--detector", help="centernet, ssdlite or fasterrcnn_mobilenet."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="timm backbone of centernet, e.g. resnet18."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Longer side of the resized fields."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Used when the data has no val split."),
    init: Optional[Path] = typer.Option(None, "--init", help="leukolab run whose backbone initialises the detector's."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    check_images: Optional[bool] = typer.Option(None, "--check-images/--no-check-images"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    mosaic: Optional[float] = typer.Option(None, "--mosaic",
                                           help="Probability of a 4-field mosaic sample (default 0.5; 0 = off)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name prefix."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
) -> None:
    """Train a detector; writes config.yaml, splits.csv, history.csv, curves.png, best.pt, last.pt."""
    from leukolab.pipelines.detect import train_detector

    overrides = {
        "data.path": str(data) if data is not None else None, "data.img_size": img_size,
        "data.batch_size": batch_size, "data.val_fraction": val_fraction, "data.check_images": check_images,
        "model.detector": detector, "model.detector_kwargs.backbone": backbone,
        "model.init": str(init) if init is not None else None, "optim.lr": lr, "train.epochs": epochs,
        "train.device": device, "seed": seed, "augment.mosaic": mosaic,
    }
    if resume is not None:
        overrides["data.path"] = None if data is None else str(Path(data).resolve())
    elif data is None and config is None:
        raise LeukolabError("no DATA given; expected a VOC, COCO or YOLO detection folder")
    run_dir = train_detector(out, config, overrides, resume=resume, name=name)
    typer.echo(f"run folder: {run_dir}")


@detect_app.command("evaluate")
def evaluate(
    run: Path = typer.Argument(..., help="A leukolab detect run folder."),
    data: Optional[Path] = typer.Option(None, "--data", help="Annotated test fields (default: the run's val fields)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default RUN/eval, RUN/eval-2 ...)."),
    score: float = typer.Option(0.3, "--score", help="Score threshold of precision / recall / counts."),
    class_score: Optional[list[str]] = typer.Option(None, "--class-score", help="CLASS=SCORE, repeatable."),
    tile: bool = typer.Option(False, "--tile/--no-tile", help="Tile fields larger than the training fields."),
    backend: str = typer.Option("torch", "--backend", help=BACKEND_HELP),
    tta: bool = typer.Option(False, "--tta/--no-tta", help=TTA_HELP),
) -> None:
    """COCO-style AP per class (IoU 0.5 and 0.5:0.95), PR curves and annotated example fields."""
    from leukolab.pipelines.detect import evaluate_detector, summary_line

    out_dir = evaluate_detector(run, data, out, score, _class_scores(class_score), tile, backend=backend, tta=tta)
    typer.echo(summary_line(out_dir / "metrics.json"))
    typer.echo(f"wrote {out_dir}/metrics.json, pr_<class>.png, examples/")


@detect_app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="A leukolab detect run folder."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(..., "--out", help="New folder to write."),
    score: float = typer.Option(0.3, "--score", help="Keep detections scoring at least this."),
    class_score: Optional[list[str]] = typer.Option(None, "--class-score", help="CLASS=SCORE, repeatable."),
    tile: bool = typer.Option(False, "--tile/--no-tile", help="Overlapping tiles for images larger than a field."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Tile side in image pixels (default: field)."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Tile overlap in px (default: 1.1 x largest cell)."),
    draw: bool = typer.Option(True, "--draw/--no-draw", help="Write annotated PNGs."),
    backend: str = typer.Option("torch", "--backend", help=BACKEND_HELP),
    tta: bool = typer.Option(False, "--tta/--no-tta", help=TTA_HELP),
) -> None:
    """Boxes (boxes.csv, COCO results.json), counts per image (counts.csv) and annotated fields."""
    from leukolab.pipelines.detect import predict_detector

    out_dir = predict_detector(run, list(images), out, score, _class_scores(class_score), tile, tile_size, overlap,
                               draw, backend=backend, tta=tta)
    typer.echo(f"wrote {out_dir}/boxes.csv, results.json, counts.csv" + (", annotated/" if draw else ""))


@detect_app.command("export")
def export(
    run: Path = typer.Argument(..., help="A leukolab detect run folder (centernet)."),
    out: Path = typer.Option(..., "--out", help="New .onnx file to write."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
) -> None:
    """The run's network as ONNX (uint8 NCHW 'images' -> 'heatmap' logits, 'distances' px; dynamic sizes)."""
    from leukolab.pipelines.detect import export_detector

    path = export_detector(run, out, opset)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@detect_app.command("stats")
def stats(data: Path = typer.Argument(..., help="VOC, COCO or YOLO detection folder.")) -> None:
    """Per-class box counts and box sizes (pixels)."""
    from leukolab.pipelines.detect import detection_stats

    table = detection_stats(data)
    typer.echo(f"{table.attrs['format'].upper()} layout, {table.attrs['images']} images")
    typer.echo(table.to_string(float_format=lambda v: f"{v:.1f}"))
    if table.attrs.get("repairs"):
        typer.echo(f"warning: {table.attrs['repairs']}", err=True)
