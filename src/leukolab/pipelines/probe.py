"""The ``probe`` recipe: weighted kNN and linear probes of a features file, written to a new folder.

The probes and their tables live in :mod:`leukolab.evaluation.probe`; this
module picks the rows (cross-validation, or a fixed train / test split),
names a new folder and writes into it ``probe.csv`` (one row per fold and
method), ``probe_summary.csv`` (mean ± std per method) and ``probe.md`` (the
summary with a line saying how it was computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leukolab.errors import LeukolabError
from leukolab.evaluation.features import FEATURE_SUFFIXES, FeatureSet, load_features
from leukolab.evaluation.probe import cross_validate_probes, evaluate_fixed_split, write_probe_tables
from leukolab.utils.files import write_text
from leukolab.utils.runs import unique_child

__all__ = ["ProbeOptions", "probe_features", "select_rows"]


@dataclass
class ProbeOptions:
    """How :func:`probe_features` fits and scores the probes.

    Attributes:
        folds: stratified cross-validation folds (without ``train``/``test``).
        seed: seed of the folds and the probes.
        train: fixed split: a features file, or a ``split``/``source`` value of the features, to fit on.
        test: the same, to score on (give both or neither).
        ks: the k of the kNN probes.
        n_jobs: processes for the linear probe's C search.
        knn_standardise: z-score the features (training-fold statistics) before the kNN probes.
        show_progress: draw a progress bar.
    """

    folds: int = 5
    seed: int = 0
    train: str | None = None
    test: str | None = None
    ks: Sequence[int] = (1, 20)
    n_jobs: int | None = None
    knn_standardise: bool = False
    show_progress: bool = True


def select_rows(fs: FeatureSet, spec: str, role: str, feats_path: Path) -> FeatureSet:
    """A features file, or the rows of ``fs`` whose ``split`` or ``source`` column equals ``spec``."""
    candidate = Path(spec)
    if candidate.suffix.lower() in FEATURE_SUFFIXES and candidate.is_file():
        return load_features(candidate)
    columns = [c for c in ("split", "source") if fs.extra is not None and c in fs.extra.columns]
    for col in columns:
        values = fs.extra[col].astype(str)
        if (values == spec).any():
            return fs.subset(np.flatnonzero(values.to_numpy() == spec))
    known = sorted({str(v) for c in columns for v in fs.extra[c].astype(str).unique()})
    hint = f"a value of its split/source column ({', '.join(known[:8])})" if known else "a features file"
    raise LeukolabError(f"--{role} {spec!r}: not a features file and not found in {feats_path}; expected {hint}")


def probe_features(
    feats: Path | str, out: Path | str | None = None, options: ProbeOptions | None = None
) -> tuple[Path, str]:
    """kNN and linear probes of a features file, written into a new folder (see the module docstring).

    Without ``train``/``test``: stratified ``folds``-fold cross-validation.
    With both: fit on ``train`` and score on ``test``. The folder is ``out``
    (uniquified: ``out-2``, ...) or ``FEATS_stem-probe`` next to ``feats``.
    Returns ``(folder, markdown table)``.
    """
    opts = options or ProbeOptions()
    feats = Path(feats)
    fs = load_features(feats)
    if (opts.train is None) != (opts.test is None):
        raise LeukolabError("give both --train and --test, or neither (then the probes are cross-validated)")
    common = {"seed": opts.seed, "ks": opts.ks, "progress": opts.show_progress, "n_jobs": opts.n_jobs,
              "knn_standardise": opts.knn_standardise}
    if opts.train is not None and opts.test is not None:
        train_fs = select_rows(fs, opts.train, "train", feats)
        test_fs = select_rows(fs, opts.test, "test", feats)
        results = evaluate_fixed_split(train_fs, test_fs, **common)
        how = (f"fit on {opts.train} ({len(train_fs)} rows), scored on {opts.test} ({len(test_fs)} rows), "
               f"seed {opts.seed}")
        classes = train_fs.classes
    else:
        results = cross_validate_probes(fs, folds=opts.folds, **common)
        how = f"stratified {opts.folds}-fold cross-validation, seed {opts.seed}"
        classes = fs.classes
    parent, name = (feats.parent, f"{feats.stem}-probe") if out is None else (Path(out).parent, Path(out).name)
    out_dir = unique_child(parent, name)
    table = write_probe_tables(results, out_dir)
    write_text(out_dir / "probe.md", (
        f"# Probes of {feats.name}\n\n"
        f"{len(fs)} rows, {fs.dim} dimensions, {len(classes)} classes; {how}. "
        "Metrics in percent, mean (± std over folds).\n\n" + table
    ))
    return out_dir, table
