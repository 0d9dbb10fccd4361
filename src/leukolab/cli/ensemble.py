"""``leukolab ensemble fit``: a weighted ensemble of trained classifiers."""

from __future__ import annotations

from pathlib import Path

import typer

from leukolab.cli.app import add_group

ensemble_app = add_group("ensemble", "Weighted ensembles of trained classifiers (accepted by evaluate, predict and "
                                     "smear analyse wherever a run is).")


@ensemble_app.command("fit")
def ensemble_fit(
    runs: list[Path] = typer.Argument(..., help="leukolab train run folders (backbones and input sizes may differ)."),
    data: Path = typer.Option(..., "--data", help="Labelled validation images the weights are fitted on."),
    out: Path = typer.Option(..., "--out", help="New ensemble folder."),
    objective: str = typer.Option("log_loss", "--objective", help="log_loss (minimised), balanced_accuracy "
                                                                   "(maximised) or equal (1/M each, not fitted)."),
    tta: bool = typer.Option(False, "--tta", help="Members average over the 8 flips/90-degree rotations."),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="Image-decoding processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fit one weight per run on validation data; writes ensemble.yaml, members.csv and metrics.json."""
    from leukolab.pipelines.ensemble import EnsembleOptions, ensemble_summary, fit_ensemble

    options = EnsembleOptions(objective=objective.replace("-", "_"), tta=tta, batch_size=batch_size,
                              show_progress=progress, num_workers=workers)
    folder = fit_ensemble(list(runs), data, out, options)
    typer.echo(ensemble_summary(folder))
    typer.echo(f"wrote {folder}/ensemble.yaml, members.csv, metrics.json")
