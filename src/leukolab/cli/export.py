"""``leukolab export``: a run's backbone as a plain timm-named checkpoint (LoRA folded in with ``--merge``)."""

from __future__ import annotations

from pathlib import Path

import typer

from leukolab.cli.app import app


@app.command()
def export(
    run: Path = typer.Argument(..., help="A leukolab train run folder (or its best.pt)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write (new file)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the run's LoRA adapter into the backbone weights."),
) -> None:
    """Write a run's backbone (timm names + backbone_spec) for --init, embed, probe or timm."""
    from leukolab.pipelines.export import export_run

    path = export_run(run, out, merge=merge)
    typer.echo(f"wrote {path}")
