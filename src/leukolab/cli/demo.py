"""``leukolab demo``: the whole pipeline on embedded synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer

from leukolab.cli.app import app


@app.command()
def demo(
    out: Path = typer.Option(Path("leukolab_demo"), "--out", help="Parent folder; the demo makes a new subfolder."),
    seed: int = typer.Option(0, "--seed"),
    quick: bool = typer.Option(False, "--quick", help="Tiny data and 2 epochs (a smoke test, ~30 s)."),
    full: bool = typer.Option(False, "--full", help="Also MAE-pretrain on a synthetic pool and compare scratch vs "
                              "pretrained at 10 % and 1 % labels."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Synthesise WBC crops, train a classifier, evaluate it and say where everything is."""
    from leukolab.pipelines.demo import run_demo

    r = run_demo(out, seed=seed, quick=quick, progress=progress, full=full)
    s = r["seconds"]
    timing = f"data {s['data']:.0f} s, training {s['train']:.0f} s"
    if full:
        timing += (f", pretraining {r['seconds_full']['pretrain']:.0f} s, "
                   f"label-efficiency {r['seconds_full']['experiment']:.0f} s")
    typer.echo(f"demo finished in {s['total']:.0f} s ({timing})")
    typer.echo(f"test set: {r['summary']}")
    typer.echo(f"data:        {r['data']}")
    typer.echo(f"run:         {r['run']}  (config.yaml, history.csv, best.pt, last.pt, curves.png)")
    typer.echo(f"evaluation:  {r['eval']}  (metrics.json, predictions.csv, confusion_matrix.png, curves.png)")
    if full:
        typer.echo(f"pool:        {r['pool']}")
        typer.echo(f"pretraining: {r['pretrain']}  (reconstructions.png, curves.png, last.pt)")
        typer.echo(f"experiment:  {r['experiment']}  (label_efficiency.csv/.md/.png)")
        typer.echo(r["table"])
