"""``leukolab embed | probe | convert | report`` and ``leukolab viz umap | attention | pca``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app
from leukolab.errors import LeukolabError

viz_app = typer.Typer(help="Pictures of embeddings and of what a ViT looks at.", no_args_is_help=True)
app.add_typer(viz_app, name="viz")

MODEL_HELP = (
    "leukolab run folder or checkpoint (classification or pretraining), a backbone written by "
    "'leukolab convert', or a raw DINOv2/timm ViT file."
)


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
    norm: Optional[str] = typer.Option(None, "--norm", help="Input normalisation: leukolab or imagenet "
                                       "(default: the model's; imagenet for converted/external weights)."),
    random_init: bool = typer.Option(False, "--random-init", help="MODEL's architecture with random weights "
                                     "(the floor for a pretrained backbone)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """One embedding per image (with path, label, source) into a features file for probe / viz."""
    from leukolab.pipelines.embed import embed_dataset

    path, fs, meta = embed_dataset(model, list(data), out, pool=pool, img_size=img_size, batch_size=batch_size,
                                   device=device, show_progress=progress, labels=labels, num_heads=num_heads,
                                   random_init=random_init, seed=seed, norm=norm, layer=layer,
                                   final_norm=final_norm)
    for note in meta["notes"]:
        typer.echo(f"note: {note}", err=True)
    labelled = f"{len(fs.classes)} classes" if fs.labels is not None else "unlabelled"
    typer.echo(f"wrote {path}: {len(fs)} rows x {fs.dim} dims ({labelled}; {meta['backbone']} at "
               f"{meta['img_size']} px, pool {meta['pool']}{_layer_text(meta)}, {meta['normalisation']} normalisation)")


def _layer_text(meta: dict) -> str:
    if meta.get("layer") is None:
        return ""
    return f" of block {meta['layer']}" + ("" if meta["final_norm"] else " (no final norm)")


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
    from leukolab.pipelines.embed import probe_features

    out_dir, table = probe_features(feats, folds=folds, seed=seed, train=train, test=test, out=out,
                                    ks=_parse_ks(k), show_progress=progress, n_jobs=n_jobs,
                                    knn_standardise=knn_standardise)
    typer.echo(table, nl=False)
    typer.echo(f"wrote {out_dir}/probe.csv, probe.md")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="DINOv2 / DinoBloom / timm / HF-ViTMAE checkpoint (.pth, .pt, "
                                         ".safetensors)."),
    out: Path = typer.Option(..., "--out", help="New leukolab backbone file."),
    fmt: Optional[str] = typer.Option(None, "--format", help="dinov2, timm or hf-vitmae (default: detected)."),
    img_size: int = typer.Option(224, "--img-size", help="Image size the converted model is built for."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Heads (only for non-standard widths)."),
    strict: bool = typer.Option(True, "--strict/--no-strict", help="Refuse checkpoints that do not fill the model."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Read files holding Python objects (runs code from the file!)."),
) -> None:
    """Convert an external ViT checkpoint into a timm backbone usable with --init, embed and viz."""
    from leukolab.zoo.convert import convert_checkpoint

    report = convert_checkpoint(src, out, fmt, img_size, num_heads=num_heads, strict=strict,
                                allow_pickle=allow_pickle)
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="One run folder (a report) or several (a comparison)."),
    out: Optional[Path] = typer.Option(None, "--out", help="New HTML file (default RUN/report.html for one run, "
                                                           "comparison.html for several)."),
    depth: int = typer.Option(3, "--depth", help="Folder levels searched below each run."),
    max_images: int = typer.Option(40, "--max-images", help="Figures embedded per run at most."),
    title: Optional[str] = typer.Option(None, "--title"),
) -> None:
    """A self-contained HTML page: config, metrics, history, probe tables and figures of the run(s)."""
    from leukolab.evaluation.report import write_report

    if out is None:
        out = runs[0] / "report.html" if len(runs) == 1 else Path("comparison.html")
    path = write_report(runs, out, max_depth=depth, max_images=max_images, title=title)
    typer.echo(f"wrote {path}")


@viz_app.command("umap")
def viz_umap(
    feats: Path = typer.Argument(..., help="Features file written by 'leukolab embed'."),
    color_by: str = typer.Option("label", "--color-by", help="label, source, split or another column."),
    method: str = typer.Option("umap", "--method", help="umap (needs umap-learn), tsne or pca."),
    out: Optional[Path] = typer.Option(None, "--out", help="New .png (the .html goes next to it); default "
                                                           "FEATS_stem-METHOD-map.png next to FEATS."),
    seed: int = typer.Option(0, "--seed"),
    normalise: bool = typer.Option(True, "--normalise/--no-normalise", help="L2-normalise the rows first."),
) -> None:
    """2-D map of an embedding: PNG plus an interactive, self-contained HTML (hover shows path and label)."""
    from leukolab.evaluation.features import load_features
    from leukolab.evaluation.umap_plot import METHODS, embedding_plot

    if method not in METHODS:
        raise LeukolabError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if out is None:
        out = feats.parent / f"{feats.stem}-{method}-map.png"
    fs = load_features(feats)
    png, html = embedding_plot(fs, out, color_by=color_by, method=method, seed=seed, normalise=normalise)
    typer.echo(f"wrote {png} and {html}")


@viz_app.command("attention")
def viz_attention(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs (one per image)."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    limit: int = typer.Option(16, "--limit", help="At most this many images."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads"),
    norm: Optional[str] = typer.Option(None, "--norm", help="Input normalisation: leukolab or imagenet "
                                       "(default: the model's; imagenet for converted/external weights)."),
) -> None:
    """Last-block attention of the class and register tokens to the patches, per head and head mean."""
    from leukolab.pipelines.embed import attention_figures

    written = attention_figures(model, list(images), out, img_size=img_size, limit=limit, num_heads=num_heads,
                                 norm=norm)
    typer.echo(f"wrote {len(written)} attention figure(s) to {out}")


@viz_app.command("pca")
def viz_pca(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(..., "--out", help="New .png file."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    limit: int = typer.Option(16, "--limit", help="At most this many images."),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground cut on the first component, in [0, 1)."),
    foreground: bool = typer.Option(True, "--foreground/--no-foreground", help="Remove the background."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads"),
    norm: Optional[str] = typer.Option(None, "--norm", help="Input normalisation: leukolab or imagenet "
                                       "(default: the model's; imagenet for converted/external weights)."),
) -> None:
    """First 3 PCA components of the patch features (fitted over all images) as RGB, background removed."""
    from leukolab.pipelines.embed import pca_figure

    path = pca_figure(model, list(images), out, img_size=img_size, limit=limit,
                      threshold=threshold if foreground else None, num_heads=num_heads, norm=norm)
    typer.echo(f"wrote {path}")
