"""``leukolab embed | probe``: image embeddings from any backbone, and probes of them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import ALLOW_PICKLE_HELP, MODEL_HELP, NORM_HELP, app
from leukolab.errors import LeukolabError


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise LeukolabError(f"--k {text!r}: expected integers like 1,20") from None
    if not ks:
        raise LeukolabError(f"--k {text!r}: expected integers like 1,20")
    return ks


@app.command()
def embed(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    data: list[Path] = typer.Argument(..., help="ImageFolder tree / split folder / CSV, or a folder of unlabelled "
                                                "images; several are stacked (column 'source')."),
    out: Path = typer.Option(..., "--out", help="New features file, .npz or .parquet."),
    pool: str = typer.Option("cls", "--pool", help="ViT pooling: cls, mean (of patch tokens) or both."),
    layer: int = typer.Option(-1, "--layer", help="ViT block whose tokens are pooled (0-based; -1 = last)."),
    final_norm: bool = typer.Option(True, "--final-norm/--no-final-norm",
                                    help="Pass the tokens through the ViT's final LayerNorm."),
    img_size: Optional[int] = typer.Option(None, "--img-size",
                                           help="Input size (default: the checkpoint's; 224 for raw files)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Read class labels from DATA when it has them."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Head count of a raw ViT of unusual width."),
    norm: Optional[str] = typer.Option(None, "--norm", help=NORM_HELP),
    random_init: bool = typer.Option(False, "--random-init", help="MODEL's architecture with random weights "
                                     "(the floor for a pretrained backbone)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    preprocess: str = typer.Option("release", "--preprocess",
                                   help="release: the weights' own evaluation recipe (DINOv2: resize 256 bicubic "
                                        "+ centre crop 224); resize: the whole image resized to --img-size."),
) -> None:
    """One embedding per image (with path, label, source) into a features file for probe / viz.

    A classifier run's images get its recorded cell crop / stain normalisation first, as in evaluate."""
    from leukolab.pipelines.embed import EmbedOptions, embed_dataset

    options = EmbedOptions(pool=pool, layer=layer, final_norm=final_norm, img_size=img_size, norm=norm,
                           num_heads=num_heads, labels=labels, random_init=random_init, seed=seed,
                           batch_size=batch_size, device=device, show_progress=progress, allow_pickle=allow_pickle,
                           preprocess=preprocess)
    result = embed_dataset(model, list(data), out, options)
    if result is None:  # another torchrun rank than 0: rank 0 writes
        return
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    fs, loaded = result.features, result.model
    labelled = f"{len(fs.classes)} classes" if fs.labels is not None else "unlabelled"
    tokens = "" if result.layer is None else f" of block {result.layer}" + (
        "" if result.final_norm else " (no final norm)")
    typer.echo(f"wrote {result.path}: {len(fs)} rows x {fs.dim} dims ({labelled}; {loaded.name} at "
               f"{loaded.img_size} px, pool {result.pool}{tokens}, {loaded.norm_name} normalisation)")


@app.command()
def probe(
    feats: Path = typer.Argument(..., help="Features file written by 'leukolab embed' (.npz or .parquet)."),
    folds: int = typer.Option(5, "--folds", help="Stratified cross-validation folds."),
    seed: int = typer.Option(0, "--seed"),
    train: Optional[str] = typer.Option(None, "--train", help="Fixed split: features file, or a split/source "
                                                              "value of FEATS, to fit on."),
    test: Optional[str] = typer.Option(None, "--test", help="Fixed split: features file or split/source value "
                                                            "to score on."),
    out: Optional[Path] = typer.Option(None, "--out", help="New folder (default FEATS_stem-probe next to FEATS)."),
    k: str = typer.Option("1,20", "--k", help="Comma-separated k of the kNN probes."),
    n_jobs: Optional[int] = typer.Option(None, "--n-jobs", help="Processes for the linear probe's C search."),
    knn_standardise: bool = typer.Option(False, "--knn-standardise/--no-knn-standardise",
                                         help="Z-score features (training-fold statistics) before the kNN probes."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Weighted kNN and linear probes; prints the table, writes probe.csv (per fold) and probe.md."""
    from leukolab.pipelines.probe import ProbeOptions, probe_features

    options = ProbeOptions(folds=folds, seed=seed, train=train, test=test, ks=_parse_ks(k), n_jobs=n_jobs,
                           knn_standardise=knn_standardise, show_progress=progress)
    out_dir, table = probe_features(feats, out, options)
    typer.echo(table, nl=False)
    typer.echo(f"wrote {out_dir}/probe.csv, probe_summary.csv, probe.md")
