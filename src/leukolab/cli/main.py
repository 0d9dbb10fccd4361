"""``leukolab`` entry point: runs the typer app and turns user errors into one line + exit 2."""

from __future__ import annotations

import importlib
import sys

import typer

# typer >= 0.20 vendors click; its exceptions live here (plain click's are kept as a fallback)
try:
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_exc

from leukolab.cli.app import app
from leukolab.errors import EXIT_USER_ERROR, LeukolabError

#: the command modules (``cli/<name>.py``), in the order ``leukolab --help`` lists their commands and groups;
#: a new command group is one new module plus its name here
COMMAND_MODULES = ("classify", "demo", "embed", "zoo", "report", "pretrain", "synth", "viz", "experiment", "detect",
                   "mil", "export", "ensemble", "adapt", "smear", "datatools", "masks", "serve")
for _name in COMMAND_MODULES:
    importlib.import_module(f"leukolab.cli.{_name}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="leukolab", standalone_mode=False)
    except LeukolabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except click_exc.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            print(exc.ctx.get_help())
        return 0
    except click_exc.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        print(f"error: {where}{exc.format_message()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; finished epochs are saved in the run folder (resume with --resume RUN)", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
