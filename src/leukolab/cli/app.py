"""The root typer application, and the help texts that several command groups share.

Each ``cli/<group>.py`` module adds its commands to :data:`app`, or its
command group made by :func:`add_group`; :mod:`leukolab.cli.main` imports the
modules. CLI modules only parse arguments and call :mod:`leukolab.pipelines`
(imported inside each command, so ``leukolab --help`` stays fast).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="leukolab",
    help="Blood-smear images in, answers out: synthetic data, training, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (
    "leukolab run folder or checkpoint (classification or pretraining), a backbone written by "
    "'leukolab convert', or a raw DINOv2/timm ViT file."
)
NORM_HELP = "Input normalisation: leukolab or imagenet (default: the model's; imagenet for converted/external weights)."
ALLOW_PICKLE_HELP = "Read files holding Python objects (runs code from the file!)."


def add_group(name: str, help: str) -> typer.Typer:
    """A new command group ``leukolab NAME ...`` on :data:`app`."""
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group
