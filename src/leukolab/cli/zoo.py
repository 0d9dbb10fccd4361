"""``leukolab convert``: external ViT checkpoints into leukolab/timm backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import ALLOW_PICKLE_HELP, app


@app.command()
def convert(
    src: Path = typer.Argument(..., help="DINOv2 / DinoBloom / timm / HF-ViTMAE checkpoint (.pth, .pt, "
                                         ".safetensors)."),
    out: Path = typer.Option(..., "--out", help="New leukolab backbone file."),
    fmt: Optional[str] = typer.Option(None, "--format", help="dinov2, timm or hf-vitmae (default: detected)."),
    img_size: int = typer.Option(224, "--img-size", help="Image size the converted model is built for."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Heads (only for non-standard widths)."),
    strict: bool = typer.Option(True, "--strict/--no-strict", help="Refuse checkpoints that do not fill the model."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    release: Optional[str] = typer.Option(None, "--release", help="Known release whose preprocessing the file "
                                          "records, e.g. dinov2_vits14_reg, dinobloom_b (default: matched by "
                                          "architecture)."),
) -> None:
    """Convert an external ViT checkpoint into a timm backbone usable with --init, embed and viz."""
    from leukolab.pipelines.zoo import ConvertOptions, convert_backbone

    options = ConvertOptions(fmt=fmt, img_size=img_size, num_heads=num_heads, strict=strict,
                             allow_pickle=allow_pickle, release=release)
    report = convert_backbone(src, out, options)
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")
