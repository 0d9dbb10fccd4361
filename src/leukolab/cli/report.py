"""``leukolab report``: one self-contained HTML page per run, or a comparison of several."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app


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
    from leukolab.pipelines.report import report_runs

    path = report_runs(list(runs), out, max_depth=depth, max_images=max_images, title=title)
    typer.echo(f"wrote {path}")
