"""The runs ``leukolab serve`` offers: detector runs, classifier runs and ensemble folders under a folder.

A folder is a run when it holds ``ensemble.yaml`` (an ensemble, ``leukolab ensemble fit``) or ``config.yaml``
and ``best.pt``; its kind comes from its config: ``model.detector`` (``leukolab detect train``) or a
classification config (``leukolab train``: ``mix`` / ``adapter`` / ``preset`` keys). Pretraining and MIL runs
are not listed. Metrics are read, never computed: the best validation epoch of ``history.csv`` and the newest
``eval*/metrics.json`` (``leukolab evaluate`` / ``detect evaluate``) or an ensemble's ``metrics.json``.
Only files are read; nothing is written under the folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from leukolab.errors import LeukolabError

__all__ = ["KINDS", "RunInfo", "discover_runs", "run_kind"]

KINDS = ("detector", "classifier", "ensemble")
MAX_DEPTH = 5
#: history columns shown as the best validation epoch, by kind (the first one picks the epoch)
HISTORY = {"detector": ("val_map50", "val_map50_95"),
           "classifier": ("val_balanced_accuracy", "val_accuracy", "val_f1_macro")}
EVAL_KEYS = {"detector": ("map50", "map50_95"), "classifier": ("balanced_accuracy", "accuracy", "f1_macro"),
             "ensemble": ("balanced_accuracy", "accuracy", "f1_macro", "log_loss")}


@dataclass
class RunInfo:
    """A run a page may pick: ``id`` (its path relative to the runs folder, or absolute when outside it),
    ``kind`` (one of :data:`KINDS`), ``path``, a one-line ``description`` and its ``metrics``."""

    id: str
    kind: str
    path: Path
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.path.name, "path": str(self.path),
                "description": self.description, "metrics": self.metrics, "classes": self.classes}


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_kind(folder: Path) -> str | None:
    """``detector``, ``classifier``, ``ensemble`` or None (not a run this server can use)."""
    if (folder / "ensemble.yaml").is_file():
        return "ensemble"
    if not ((folder / "config.yaml").is_file() and (folder / "best.pt").is_file()):
        return None
    cfg = _yaml(folder / "config.yaml")
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if "detector" in model:
        return "detector"
    if "method" in cfg or "encoder" in cfg or "cv" in cfg:
        return None  # pretraining / MIL
    if {"mix", "adapter", "preset"} & set(cfg) or "backbone" in model:
        return "classifier"
    return None


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 4) if math.isfinite(f) else None


def _metrics(folder: Path, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cols = HISTORY.get(kind, ())
    if cols and (folder / "history.csv").is_file():
        try:
            hist = pd.read_csv(folder / "history.csv")
        except (OSError, ValueError):
            hist = pd.DataFrame()
        if cols[0] in hist.columns and hist[cols[0]].notna().any():
            best = hist.loc[hist[cols[0]].idxmax()]
            out["epochs"] = len(hist)
            out["best_epoch"] = int(best["epoch"]) if "epoch" in hist.columns else None
            out.update({c: _number(best[c]) for c in cols if c in hist.columns})
    files = [folder / "metrics.json"] if kind == "ensemble" else sorted(
        folder.glob("eval*/metrics.json"), key=lambda p: p.stat().st_mtime)
    for file in reversed(files):
        try:
            m = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out["evaluation"] = {k: _number(m[k]) for k in EVAL_KEYS[kind] if k in m}
        out["evaluation_file"] = file.relative_to(folder).as_posix()
        break
    return out


def _describe(folder: Path, kind: str) -> tuple[str, list[str]]:
    if kind == "ensemble":
        spec = _yaml(folder / "ensemble.yaml")
        members = spec.get("members") or []
        return f"ensemble of {len(members)} run(s)", [str(c) for c in spec.get("class_names") or []]
    cfg = _yaml(folder / "config.yaml")
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    classes: list[str] = []
    if kind == "classifier":
        counts = folder / "class_counts.json"
        if counts.is_file():
            try:
                classes = [str(c) for c in json.loads(counts.read_text(encoding="utf-8")).get("class_names", [])]
            except (OSError, ValueError, AttributeError):
                classes = []
        return f"{model.get('backbone', '?')} at {data.get('img_size', '?')} px", classes
    kwargs = model.get("detector_kwargs") or {}
    return f"{model.get('detector', '?')} ({kwargs.get('backbone', '?')}) at {data.get('img_size', '?')} px", classes


def _info(folder: Path, root: Path, kind: str) -> RunInfo:
    try:
        rid = folder.relative_to(root).as_posix()
    except ValueError:
        rid = str(folder)
    description, classes = _describe(folder, kind)
    return RunInfo(rid, kind, folder, description, _metrics(folder, kind), classes)


def discover_runs(root: Path | str, extra: Sequence[Path | str] = ()) -> list[RunInfo]:
    """The runs under ``root`` (searched ``MAX_DEPTH`` folders deep; a run's own subfolders are not searched)
    and the ``extra`` run folders, sorted by kind and id. ``extra`` folders that are not runs are refused."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise LeukolabError(f"--runs {root}: not a folder; expected a folder holding leukolab run folders")
    found: dict[Path, RunInfo] = {}
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        kind = run_kind(here)
        if kind is not None:
            found[here] = _info(here, root, kind)
        if kind is not None or depth >= MAX_DEPTH:
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
    for p in extra:
        folder = Path(p).resolve()
        folder = folder.parent if folder.is_file() else folder
        kind = run_kind(folder)
        if kind is None:
            raise LeukolabError(f"{p}: not a detector run, classifier run or ensemble folder (expected config.yaml "
                                "and best.pt, or ensemble.yaml)")
        found.setdefault(folder, _info(folder, root, kind))
    return sorted(found.values(), key=lambda r: (KINDS.index(r.kind), r.id))
