"""``leukolab train DATA --preset NAME`` with an ensemble preset: one run per member, then an ensemble folder.

An ensemble preset (:func:`leukolab.config.ensemble_preset`) lists its members as
config overrides merged over the rest of the preset. :func:`train_ensemble_preset`
trains each member as an ordinary run (``preset_member: i`` in its config, so
each run can be resumed or rerun alone), checks that the members share their
validation and test splits, and writes an ensemble folder over them with
:func:`leukolab.pipelines.ensemble.fit_ensemble` (weights ``equal`` or fitted on
the shared validation split), which ``evaluate``, ``predict`` and ``smear
analyse`` take wherever a run is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from leukolab.config import resolve
from leukolab.errors import LeukolabError
from leukolab.training import distributed
from leukolab.utils.runs import new_run_dir

__all__ = ["train_ensemble_preset"]


def _split_sets(run: Path) -> dict[str, frozenset[str]]:
    table = pd.read_csv(run / "splits.csv")
    return {s: frozenset(table.loc[table["split"] == s, "path"].astype(str)) for s in ("val", "test")}


def train_ensemble_preset(
    out: Path | str,
    spec: dict[str, Any],
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path:
    """Train every member of the ensemble preset ``spec`` under ``out``; returns the new ensemble folder.

    Member ``i`` is ``leukolab train`` with ``preset_member: i`` (runs named ``<name>-m<i>-...`` when ``name``
    is given); the ensemble folder is ``out/<name or preset>-ensemble-<timestamp>``.

    Raises:
        LeukolabError: a member's config is invalid (checked for all members before any trains), or the
            members' validation or test splits differ (a member overrides the data or seed).
    """
    from leukolab.pipelines.classify import train_classifier
    from leukolab.pipelines.ensemble import EnsembleOptions, fit_ensemble

    overrides = dict(overrides or {})
    # every member's config is valid before any member trains
    labels = [resolve("train", config_file, {**overrides, "preset_member": i})["preset"]
              for i in range(len(spec["members"]))]
    runs = []
    for i in range(len(spec["members"])):
        if distributed.is_main() and progress:
            print(f"ensemble member {i + 1} of {len(spec['members'])}", flush=True)
        runs.append(train_classifier(out, config_file, {**overrides, "preset_member": i},
                                     name=f"{name}-m{i}" if name else None, allow_pickle=allow_pickle))
    first = _split_sets(runs[0])
    for run in runs[1:]:
        if _split_sets(run) != first:
            raise LeukolabError(f"ensemble members {runs[0].name} and {run.name} have different validation or test "
                                "splits; an ensemble preset's members must not change the data or the seed")
    stem = name or Path(str(labels[0])).stem  # the preset, named by --preset or by the --config file
    folder = distributed.shared_run_dir(lambda: new_run_dir(out, f"{stem}-ensemble"))
    options = EnsembleOptions(objective=spec["weights"], tta=spec["tta"], show_progress=progress)
    return fit_ensemble(runs, runs[0] / "splits.csv", folder, options)
