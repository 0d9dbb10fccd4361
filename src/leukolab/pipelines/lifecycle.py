"""The one run lifecycle every training task goes through: open a run, then fit it.

A task's pipeline (classify, pretrain, and next detection, MIL ...) supplies
only what differs: its packaged defaults, how to check and resolve a new
config, its data, objective and loaders. Everything else -- config resolution,
``--resume`` with the saved config (refusing overrides that disagree),
seeding, joining ``torchrun``, the run folder (new, never overwritten, made by
rank 0), ``config.yaml``, tables such as ``splits.csv``, the Trainer,
resuming from ``last.pt`` and ``curves.png`` -- happens here, once.

How a new task uses it (a detection pipeline, say, with ``configs/detect.yaml``)::

    from leukolab.pipelines.lifecycle import open_run
    from leukolab.registry import OBJECTIVES
    from leukolab.training.loaders import build_loader

    def train_detector(out=None, config_file=None, overrides=None, resume=None, name=None) -> Path:
        run = open_run("detect", out, config_file, overrides, resume,
                       name=name or (lambda cfg: f"{cfg['model']['detector']}-s{cfg['seed']}"),
                       prepare=resolve_paths)           # new runs only: check options, make paths absolute
        cfg = run.cfg                                     # nothing is written yet: bad options leave nothing
        train_ds, val_ds, table = read_boxes(cfg["data"], run.seed)
        objective = OBJECTIVES.build("detection", **cfg["detection"])
        kw = dict(num_workers=cfg["data"]["num_workers"], seed=run.seed, collate_fn=collate_boxes)
        run.fit(objective, build_loader(train_ds, 8, train=True, **kw), build_loader(val_ds, 8, train=False, **kw),
                tables={"splits.csv": table})
        return run.dir

:meth:`Run.fit` returns the :class:`~leukolab.training.loop.Trainer`
(``trainer.history``, ``trainer.objective``) for whatever the task writes next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from leukolab.config import diff_overrides, fill_missing, load_defaults, read_yaml, resolve
from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import record
from leukolab.evaluation.plots import plot_curves
from leukolab.evaluation.tables import write_table
from leukolab.objectives.base import Objective
from leukolab.training import distributed
from leukolab.training.loop import EpochCallback, Trainer, TrainerConfig
from leukolab.utils.files import write_text
from leukolab.utils.runs import new_run_dir
from leukolab.utils.seed import seed_everything

__all__ = ["Run", "open_run"]


@dataclass
class Run:
    """An opened run: its resolved config, seed, and (once created) its folder.

    Attributes:
        task: the packaged defaults it was resolved from (``train``, ``pretrain`` ...).
        cfg: the resolved config (for a resumed run: the saved one).
        seed: ``cfg["seed"]``; Python, NumPy and torch are seeded with it.
        resumed: whether this continues an interrupted run in :attr:`dir`.
        out: the parent folder of a new run.
        name: the run folder's name prefix.
        dir: the run folder (``None`` until :meth:`create` or :meth:`fit`).
    """

    task: str
    cfg: dict[str, Any]
    seed: int
    resumed: bool
    out: Path | None = None
    name: str = "run"
    dir: Path | None = field(default=None)

    def create(self, tables: Mapping[str, pd.DataFrame] | None = None) -> Path:
        """Make the new run folder (rank 0; shared with every rank) and write ``config.yaml`` and ``tables``.

        A resumed run keeps its folder and files. Idempotent.
        """
        if self.dir is not None:
            return self.dir
        if self.out is None:
            raise LeukolabError("no --out folder given for the run")
        self.dir = distributed.shared_run_dir(lambda: new_run_dir(self.out, self.name))
        if distributed.is_main():
            write_text(self.dir / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
            record(self.dir, "config.yaml", "config", f"resolved {self.task} config")
            for filename, table in (tables or {}).items():
                write_table(table, self.dir / filename, filename)
        return self.dir

    def fit(
        self,
        objective: Objective,
        train_loader: Any,
        val_loader: Any | None,
        trainer_config: TrainerConfig | None = None,
        tables: Mapping[str, pd.DataFrame] | None = None,
        meta: Mapping[str, Any] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        curves: bool = True,
    ) -> Trainer:
        """Train ``objective`` in this run's folder and draw ``curves.png``; returns the Trainer.

        Creates the folder of a new run first (with ``config.yaml`` and ``tables``);
        a resumed run continues from its ``last.pt``. Every checkpoint stores the
        config (``config``) and ``meta``. ``trainer_config`` defaults to the
        config's ``optim``/``train`` sections; ``callbacks`` run after every epoch.
        ``curves=False`` skips drawing ``curves.png`` (many short fits in one run, e.g. cross-validation
        folds, where matplotlib would cost more than the training).
        """
        run_dir = self.create(tables)
        config = trainer_config or TrainerConfig.from_config(self.cfg)
        trainer = Trainer(objective, config, run_dir, meta={"config": self.cfg, **(meta or {})}, callbacks=callbacks)
        if self.resumed:
            trainer.resume(run_dir / "last.pt")
        trainer.fit(train_loader, val_loader)
        if distributed.is_main():  # drawn from the whole history, so a resumed run's figure loses nothing
            record(run_dir, "history.csv", "history", "training history, one row per epoch")
            if curves:
                plot_curves(pd.DataFrame(trainer.history), run_dir / "curves.png", title=run_dir.name)
        return trainer


def _saved_config(task: str, run_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if not (run_dir / "config.yaml").is_file():
        raise LeukolabError(f"cannot resume: {run_dir} has no config.yaml; expected a leukolab {task} run folder")
    cfg = read_yaml(run_dir / "config.yaml")
    defaults = load_defaults(task)
    if not (set(cfg) <= set(defaults) and {"seed", "data", "optim", "train"} <= set(cfg)):
        raise LeukolabError(f"cannot resume: {run_dir} is not a leukolab {task} run")
    cfg = fill_missing(cfg, defaults)  # keys added since the run was written: their defaults keep its behaviour
    conflicts = diff_overrides(cfg, dict(overrides))
    if conflicts:
        raise LeukolabError(f"cannot resume {run_dir} with a different config: {'; '.join(conflicts)}")
    return cfg


def open_run(
    task: str,
    out: Path | str | None,
    config_file: Path | str | None,
    overrides: Mapping[str, Any] | None,
    resume: Path | str | None,
    *,
    name: str | Callable[[dict[str, Any]], str],
    prepare: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Resolve the config of a new or resumed run, seed, and join ``torchrun``; nothing is written yet.

    Args:
        task: the packaged defaults (``leukolab/configs/<task>.yaml``).
        out: parent folder of a new run (a resumed run keeps its folder).
        config_file: YAML merged over the defaults (new runs).
        overrides: dotted keys (``{"optim.lr": 1e-3}``) merged last; ``None`` values are ignored.
            On resume they must agree with the saved config.
        resume: the folder of an interrupted run, continued with its saved ``config.yaml``.
        name: the run folder's name prefix, or a function of the resolved config giving it.
        prepare: called with a new run's resolved config to check it and resolve paths (in place).

    Raises:
        LeukolabError: unknown keys, a config that ``prepare`` refuses, or a resume folder
            that is not a run of ``task`` / disagrees with ``overrides``.
    """
    overrides = dict(overrides or {})
    if resume is not None:
        run_dir = Path(resume)
        cfg = _saved_config(task, run_dir, overrides)
    else:
        run_dir = None
        cfg = resolve(task, Path(config_file) if config_file is not None else None, overrides)
        if prepare is not None:
            prepare(cfg)
    seed = int(cfg["seed"])
    seed_everything(seed)
    distributed.init_distributed(cfg["train"]["device"])
    label = name(cfg) if callable(name) else name
    return Run(task, cfg, seed, resume is not None, Path(out) if out is not None else None, label, run_dir)
