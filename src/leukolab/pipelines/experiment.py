"""Label-efficiency experiment: from scratch vs pretrained inits at several label fractions and seeds.

Each cell (init, mode, fraction, seed) is one ordinary ``train`` run followed by
an evaluation on the test split. Finished cells are added to
``label_efficiency.csv`` as they complete, so an interrupted experiment resumes
where it stopped without redoing them. The summary tables (CSV for the report,
markdown for people) and the figure are derived from it and redrawn at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import yaml

from leukolab.config import read_yaml
from leukolab.data.splits import check_fraction
from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import record
from leukolab.evaluation.metrics import METRICS
from leukolab.evaluation.plots import save_figure
from leukolab.evaluation.tables import (
    COLLAPSE_NOTE,
    label_efficiency_summary,
    label_efficiency_table,
    to_markdown,
    write_table,
)
from leukolab.models.weights import checkpoint_backbone_spec
from leukolab.pipelines.classify import evaluate_run, train_classifier
from leukolab.utils.files import write_text

RESULTS = "label_efficiency.csv"


def plan_cells(
    inits: dict[str, str | None], fractions: Sequence[float], seeds: Sequence[int], linear_probe: bool
) -> list[dict[str, Any]]:
    """All cells: scratch fine-tune, and fine-tune (+ linear probe) for each pretrained init."""
    cells = []
    for name, path in inits.items():
        modes = ["finetune"] + (["linear"] if linear_probe and path else [])
        for mode in modes:
            for f in fractions:
                for s in seeds:
                    cells.append({"init": name, "init_path": path, "mode": mode, "fraction": f, "seed": s})
    return cells


def added_inits(saved: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Names of pretrained inits ``want`` adds to the ``saved`` setup; empty when it changes anything else."""
    same_rest = {k: v for k, v in saved.items() if k != "pretrained"} == {
        k: v for k, v in want.items() if k != "pretrained"}
    old, new = saved.get("pretrained") or {}, want.get("pretrained") or {}
    if not same_rest or any(new.get(k) != v for k, v in old.items()):
        return []
    return [k for k in new if k not in old]


def cell_key(cell: dict[str, Any]) -> str:
    """A stable id of a cell."""
    return f"{cell['init']}|{cell['mode']}|{cell['fraction']:g}|{cell['seed']}"


def run_label_efficiency(
    data: Path | str,
    out: Path | str,
    pretrained: dict[str, str],
    fractions: Sequence[float] = (1.0, 0.5, 0.1, 0.01),
    seeds: int = 3,
    base_overrides: dict[str, Any] | None = None,
    linear_probe: bool = True,
    linear_lr: float = 1e-2,
    log: Callable[[str], None] = print,
    finetune_layer_decay: float = 1.0,
) -> Path:
    """Run (or resume) the experiment into ``out``; returns ``out``."""
    fractions = [check_fraction(float(f)) for f in fractions]
    if seeds < 1:
        raise LeukolabError(f"--seeds {seeds} must be >= 1")
    for name, path in pretrained.items():
        if name == "scratch":
            raise LeukolabError("'scratch' is reserved for the from-scratch baseline; pick another init name")
        if not Path(path).exists():
            raise LeukolabError(f"pretrained init {name}={path} does not exist")
    out = Path(out)
    spec = {
        "data": str(Path(data).resolve()), "pretrained": {k: str(Path(v).resolve()) for k, v in pretrained.items()},
        "fractions": fractions, "seeds": seeds, "overrides": base_overrides or {}, "linear_probe": linear_probe,
        "linear_lr": linear_lr,
    }
    if not 0.0 < finetune_layer_decay <= 1.0:
        raise LeukolabError(f"--finetune-layer-decay {finetune_layer_decay} is outside (0, 1]; expected e.g. 0.75")
    if finetune_layer_decay != 1.0:  # recorded only when used, so experiments from before it still resume
        spec["finetune_layer_decay"] = finetune_layer_decay
    if (out / "experiment.yaml").is_file():
        saved = read_yaml(out / "experiment.yaml")
        want = json.loads(json.dumps(spec))
        if saved != want:
            added = added_inits(saved, want)
            if not added:
                raise LeukolabError(f"{out} holds an experiment with a different setup; use a new --out folder")
            # the inits already there keep their place (the first one fixes the architecture)
            spec["pretrained"] = {**saved["pretrained"], **{k: want["pretrained"][k] for k in added}}
            write_text(out / "experiment.yaml", yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False),
                       overwrite=True)
            log(f"adding {', '.join(added)} to the experiment in {out}; finished cells are kept")
        else:
            log(f"resuming the experiment in {out}")
    else:
        write_text(out / "experiment.yaml", yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False))
    record(out, "experiment.yaml", "config", "experiment setup")
    inits: dict[str, str | None] = {"scratch": None, **spec["pretrained"]}
    # the first pretrained init fixes the architecture of every cell (scratch included)
    arch = checkpoint_backbone_spec(next(iter(spec["pretrained"].values()))) if pretrained else None
    results_path = out / RESULTS
    done = set()
    if results_path.is_file():
        done = {cell_key(r) for r in pd.read_csv(results_path).to_dict("records")}
    cells = plan_cells(inits, fractions, range(seeds), linear_probe)
    todo = [c for c in cells if cell_key(c) not in done]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already done")
    for i, cell in enumerate(todo, 1):
        overrides = dict(base_overrides or {})
        if arch is not None:
            overrides.setdefault("model.backbone", arch.name)
            overrides.setdefault("model.backbone_kwargs", dict(arch.kwargs))
            if arch.img_size:
                overrides.setdefault("data.img_size", arch.img_size)
        overrides.update({
            "data.path": spec["data"], "data.label_fraction": cell["fraction"], "seed": cell["seed"],
            "model.init": cell["init_path"], "model.freeze_backbone": cell["mode"] == "linear",
            "data.check_images": False, "train.progress": False, "train.keep_last": 0,
        })
        if cell["mode"] == "linear":
            overrides["optim.lr"] = linear_lr
            overrides["optim.weight_decay"] = 0.0
        elif cell["init_path"] and finetune_layer_decay != 1.0:
            overrides["optim.layer_decay"] = finetune_layer_decay  # the MAE/BEiT fine-tuning recipe
        log(f"[{i}/{len(todo)}] {cell_key(cell)}")
        run_dir = train_classifier(out / "runs", overrides=overrides,
                                   name=f"{cell['init']}-{cell['mode']}-f{cell['fraction']:g}-s{cell['seed']}")
        eval_dir = evaluate_run(run_dir, check_images=False, show_progress=False)
        m = json.loads((eval_dir / "metrics.json").read_text())
        row = {k: v for k, v in cell.items() if k != "init_path"}
        row.update({k: m[k] for k in METRICS if k in m})
        row["n_predicted_classes"] = m["n_predicted_classes"]
        row["n_classes"] = len(m["class_names"])
        row["run"] = str(run_dir)
        append_row(results_path, row)
    write_summary(out)
    return out


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add a finished cell to the results CSV, rewritten atomically (an interruption leaves the old file
    or the new one). A row that brings a new column keeps every earlier row (blank in that column)."""
    frame = pd.DataFrame([row])
    if path.is_file():
        frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
    write_text(path, frame.to_csv(index=False), overwrite=True)
    record(path.parent, path.name, "table", "label efficiency: one row per finished cell")


def plot(summary: pd.DataFrame, path: Path) -> Path:
    """Balanced accuracy and macro F1 against the label fraction (log x), one line per init/mode."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("balanced_accuracy", "f1_macro"), strict=True):
        for (init, mode), part in summary.groupby(["init", "mode"], sort=False):
            part = part.sort_values("fraction")
            ax.errorbar(part["fraction"] * 100, part[f"{metric}_mean"], yerr=part[f"{metric}_std"].fillna(0),
                        marker="o", capsize=3, label=f"{init} ({mode})")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images (%)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, "label efficiency: balanced accuracy and macro F1 against the label fraction")


def write_summary(out: Path) -> None:
    """(Re)write the derived files from label_efficiency.csv: label_efficiency_summary.csv (numbers),
    label_efficiency_table.csv and .md (the display table) and label_efficiency.png."""
    results = pd.read_csv(out / RESULTS)
    summary = label_efficiency_summary(results)
    table = label_efficiency_table(summary)
    write_table(summary, out / "label_efficiency_summary.csv", "label efficiency: mean and std over seeds",
                overwrite=True)
    write_table(table, out / "label_efficiency_table.csv",
                "label efficiency: balanced accuracy / macro F1, mean ± std over seeds", overwrite=True)
    text = to_markdown(table, index=False)
    if table.map(lambda v: "⚠" in str(v)).to_numpy().any():
        text += "\n" + COLLAPSE_NOTE + "\n"
    write_text(out / "label_efficiency.md", text, overwrite=True)
    plot(summary, out / "label_efficiency.png")
