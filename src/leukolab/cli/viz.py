"""``leukolab viz umap | attention | pca``: pictures of embeddings and of what a ViT looks at."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import ALLOW_PICKLE_HELP, MODEL_HELP, NORM_HELP, add_group

viz_app = add_group("viz", "Pictures of embeddings and of what a ViT looks at.")


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
    from leukolab.pipelines.viz import embedding_map

    png, html = embedding_map(feats, out, color_by=color_by, method=method, seed=seed, normalise=normalise)
    typer.echo(f"wrote {png} and {html}")


@viz_app.command("attention")
def viz_attention(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs (one per image)."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    limit: int = typer.Option(16, "--limit", help="At most this many images (0 = all)."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads"),
    norm: Optional[str] = typer.Option(None, "--norm", help=NORM_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Last-block attention of the class and register tokens to the patches, per head and head mean.

    Prompt tokens of a prompt-tuned run are left out; a classifier run's images are prepared as in evaluate."""
    from leukolab.pipelines.viz import ViewOptions, attention_figures

    options = ViewOptions(img_size=img_size, norm=norm, num_heads=num_heads, allow_pickle=allow_pickle, limit=limit)
    written = attention_figures(model, list(images), out, options)
    typer.echo(f"wrote {len(written)} attention figure(s) to {out}")


@viz_app.command("pca")
def viz_pca(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(..., "--out", help="New .png file."),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    limit: int = typer.Option(16, "--limit", help="At most this many images (0 = all)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground cut on the first component, in [0, 1)."),
    foreground: bool = typer.Option(True, "--foreground/--no-foreground", help="Remove the background."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads"),
    norm: Optional[str] = typer.Option(None, "--norm", help=NORM_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """First 3 PCA components of the patch features (fitted over all images) as RGB, background removed."""
    from leukolab.pipelines.viz import ViewOptions, pca_figure

    options = ViewOptions(img_size=img_size, norm=norm, num_heads=num_heads, allow_pickle=allow_pickle, limit=limit)
    path = pca_figure(model, list(images), out, threshold if foreground else None, options)
    typer.echo(f"wrote {path}")
