"""The ``report`` recipe: one self-contained HTML page for a run, or a comparison of several."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leukolab.errors import LeukolabError
from leukolab.evaluation.report import write_report

__all__ = ["report_runs"]


def report_runs(
    runs: Sequence[Path | str],
    out: Path | str | None = None,
    max_depth: int = 3,
    max_images: int = 40,
    title: str | None = None,
) -> Path:
    """Write the HTML page of ``runs`` to a new file and return it.

    The default ``out`` is ``RUN/report.html`` for one run and
    ``comparison.html`` (in the working folder) for several. ``max_depth``
    folder levels below each run are searched; at most ``max_images`` figures
    a run are embedded.
    """
    if not runs:
        raise LeukolabError("no RUNS given; expected one or more run folders")
    if out is None:
        out = Path(runs[0]) / "report.html" if len(runs) == 1 else Path("comparison.html")
    return write_report(list(runs), out, max_depth=max_depth, max_images=max_images, title=title)
