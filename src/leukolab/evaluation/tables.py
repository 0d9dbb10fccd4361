"""Results tables: summaries over folds and seeds, markdown text, and the one table writer.

* :func:`mean_std` - numeric mean and standard deviation of metric columns per group;
* :func:`percent_table` - the ``"86.6 (± 0.7)"`` table of the probes (one row per method);
* :func:`label_efficiency_summary` / :func:`label_efficiency_table` - the label-efficiency
  experiment: numbers per (init, mode, fraction), then the display table (rows: init and
  mode, columns: label fractions);
* :func:`to_markdown` - a GitHub markdown table of any of them (for READMEs and the terminal);
* :func:`write_table` - writes a table as CSV (atomically) and lists it in the folder's
  artefact manifest, which is what ``leukolab report`` renders.

Markdown is written for people; the report reads the CSV, never the markdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import record
from leukolab.evaluation.metrics import METRICS
from leukolab.utils.files import write_text

__all__ = [
    "COLLAPSE_NOTE",
    "label_efficiency_summary",
    "label_efficiency_table",
    "mean_std",
    "percent_table",
    "to_markdown",
    "write_table",
]

#: footnote of a label-efficiency table in which some cell is flagged
COLLAPSE_NOTE = "⚠ k/N classes: in some seed the model predicted only k of the N classes (collapse)."
_LABEL_EFFICIENCY_KEYS = ["init", "mode", "fraction"]


def _require_columns(results: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in results.columns]
    if missing:
        raise LeukolabError(f"results table lacks the column(s) {', '.join(missing)}")


def mean_std(results: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1; NaN for a single row) of ``metrics`` per group.

    Groups keep their order of first appearance. Returns the ``by`` column(s),
    then ``<metric>_mean`` and ``<metric>_std`` for each metric, then ``n`` (rows
    per group). Metrics missing from ``results`` are left out.
    """
    keys = [by] if isinstance(by, str) else list(by)
    _require_columns(results, keys)
    present = [m for m in metrics if m in results.columns]
    grouped = results.groupby(keys, sort=False)
    out = grouped[present].agg(["mean", "std"]).reset_index() if present else grouped.size().reset_index()[keys]
    out.columns = ["_".join(c).strip("_") if isinstance(c, tuple) else c for c in out.columns]
    out["n"] = grouped.size().to_numpy()
    return out


def percent_table(results: pd.DataFrame, by: str = "method", metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean (± std) over the rows of each group, in percent, as strings.

    One row per group (index named ``by``, order of first appearance), one
    column per metric; a cell reads ``"86.6 (± 0.7)"`` (sample std) or just
    ``"86.6"`` when the group has a single row (a fixed split, one seed).
    """
    _require_columns(results, [by, *metrics])
    stats = mean_std(results, by, metrics).set_index(by)
    out = pd.DataFrame(index=pd.Index(stats.index, name=by), columns=list(metrics), dtype=object)
    for group, row in stats.iterrows():
        for metric in metrics:
            mean, std = 100 * row[f"{metric}_mean"], 100 * row[f"{metric}_std"]
            out.at[group, metric] = f"{mean:.1f}" if row["n"] < 2 or pd.isna(std) else f"{mean:.1f} (± {std:.1f})"
    return out


def label_efficiency_summary(results: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean ± std over seeds per (init, mode, fraction) of a label-efficiency results table.

    Columns: ``init``, ``mode``, ``fraction``, ``<metric>_mean`` / ``_std``,
    ``n_seeds``, ``min_predicted_classes`` (the fewest classes any seed's model
    predicted: below ``n_classes`` flags a collapse) and ``n_classes`` (NaN for
    results of a leukolab that did not record it).
    """
    _require_columns(results, [*_LABEL_EFFICIENCY_KEYS, "balanced_accuracy", "f1_macro", "n_predicted_classes"])
    out = mean_std(results, _LABEL_EFFICIENCY_KEYS, metrics).rename(columns={"n": "n_seeds"})
    grouped = results.groupby(_LABEL_EFFICIENCY_KEYS, sort=False)
    out["min_predicted_classes"] = grouped["n_predicted_classes"].min().to_numpy()
    out["n_classes"] = grouped["n_classes"].max().to_numpy() if "n_classes" in results else np.nan
    return out


def label_efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The display table of :func:`label_efficiency_summary`: one row per (init, mode), one column per
    label fraction (largest first); each cell ``"bal. acc ± std / macro F1 ± std"`` (``"(1 seed)"``
    instead of a spread for one seed, ``"–"`` when not run), flagged ``"⚠ k/N classes"`` when some
    seed's model predicted only k of the N classes (see :data:`COLLAPSE_NOTE`)."""
    fractions = sorted(summary["fraction"].unique(), reverse=True)
    rows = []
    for (init, mode), part in summary.groupby(["init", "mode"], sort=False):
        row = {"init": init, "mode": mode}
        for f in fractions:
            column = f"{f:g} labels: bal. acc / macro F1"
            match = part[part["fraction"] == f]
            if match.empty:
                row[column] = "–"
                continue
            r = match.iloc[0]
            if pd.isna(r["balanced_accuracy_std"]):  # one seed: no spread to show
                cell = f"{r['balanced_accuracy_mean']:.3f} / {r['f1_macro_mean']:.3f} (1 seed)"
            else:
                cell = (f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f} / "
                        f"{r['f1_macro_mean']:.3f} ± {r['f1_macro_std']:.3f}")
            if r.get("min_predicted_classes", 0) < r.get("n_classes", 0):  # NaN-safe: False when unknown
                cell += f" ⚠ {int(r['min_predicted_classes'])}/{int(r['n_classes'])} classes"
            row[column] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, index: bool = True) -> str:
    """A GitHub markdown table of ``table`` (with the index as the first column when ``index``);
    text left-aligned, everything else right-aligned. No extra dependency."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    def is_text(column: pd.Series) -> bool:  # names, not numbers ("86.6 (± 0.7)" counts as a number)
        return all(isinstance(v, str) and not v[:1].isdigit() for v in column)

    frame = table.reset_index() if index else table
    if index and table.index.name is None:
        frame = frame.rename(columns={"index": ""})
    align = [" --- " if i == 0 or is_text(frame[c]) else " ---: " for i, c in enumerate(frame.columns)]
    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "|".join(align) + "|"]
    for values in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    frame: pd.DataFrame, path: Path | str, title: str, *, index: bool = False, overwrite: bool = False
) -> Path:
    """Write ``frame`` as CSV to ``path`` atomically and list it (kind ``table``, ``title``) in the
    folder's artefact manifest. ``overwrite=False`` refuses an existing file (results are never
    lost); derived tables that are recomputed from kept results pass ``overwrite=True``."""
    path = Path(path)
    write_text(path, frame.to_csv(index=index), overwrite=overwrite)
    record(path.parent, path.name, "table", title)
    return path
