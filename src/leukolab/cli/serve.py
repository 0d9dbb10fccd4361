"""``leukolab serve``: a local web page and JSON API over the smear pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from leukolab.cli.app import app


@app.command()
def serve(
    runs: Path = typer.Option(..., "--runs", help="Folder searched for detector runs, classifier runs and ensemble "
                              "folders (only read, never written)."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Default detector run (default: the first "
                                            "found under --runs)."),
    classifier: list[Path] = typer.Option([], "--classifier", help="Default classifier run or ensemble folder; "
                                          "repeat to average several (default: the first found under --runs)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    max_file_mb: float = typer.Option(25.0, "--max-file-mb", help="Largest upload accepted, per file."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Most pixels per image (larger: refused)."),
    max_files: int = typer.Option(64, "--max-files", help="Most files per request."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Parent of the temporary request folders "
                                            "(default: the system's temporary folder)."),
) -> None:
    """Serve a local page: drop smear fields or cell crops, see cells, types and the differential count."""
    from leukolab.pipelines.serve import ServeLimits, ServeOptions, require_serve_dependencies

    require_serve_dependencies()
    from leukolab.pipelines.serve_app import serve as run_server

    limits = ServeLimits(max_file_mb=max_file_mb, max_pixels=max_pixels, max_files=max_files,
                         max_request_mb=max(200.0, max_file_mb * 2))
    run_server(ServeOptions(runs, detector, list(classifier), host, port, device, work_dir, limits),
               announce=lambda line: typer.echo(line))
