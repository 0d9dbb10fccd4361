"""The typer application every ``cli/cmd_*.py`` module adds its command to."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="leukolab",
    help="Blood-smear images in, answers out: synthetic data, training, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
synth_app = typer.Typer(help="Write procedural synthetic data sets.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
