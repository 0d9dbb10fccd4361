"""The one run lifecycle and Trainer serve a new kind of task: a toy multiple-instance (MIL) model.

Bags of different sizes go through ``build_loader(collate_fn=...)``, the objective brings its own
parameter groups and validation aggregate, and ``open_run`` / ``Run.fit`` write the run folder,
resume it exactly and refuse what they should -- without any MIL code in the lifecycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from leukolab.checkpoints import load_checkpoint
from leukolab.config import load_defaults
from leukolab.errors import LeukolabError
from leukolab.objectives.base import Objective, StepOutput, decay_groups
from leukolab.pipelines.lifecycle import open_run
from leukolab.registry import OBJECTIVES, PRETRAIN_METHODS, Registry
from leukolab.training.loaders import build_loader
from leukolab.training.loop import Trainer

TOY_OPTIONS = {"train.epochs": 3, "train.progress": False, "train.keep_last": 1, "train.device": "cpu",
               "optim.lr": 0.05, "optim.warmup_epochs": 0, "optim.grad_clip": None, "seed": 0}


class Bags(Dataset):
    """Bags of 2-6 instances of 4 features; a bag is positive when one instance is shifted by +3."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            bag = torch.randn(int(torch.randint(2, 7, (1,), generator=g)), 4, generator=g)
            if i % 2:
                bag[0] += 3.0
            self.items.append((bag, i % 2))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def collate_bags(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [bag for bag, _ in samples], torch.tensor([y for _, y in samples])


TOYS: Registry[Any] = Registry("toy objective")


@TOYS.register("max-pool-mil")
class MaxPoolMIL(Objective):
    """Instance encoder, max over the bag, linear head; the encoder learns at ``encoder_lr_scale`` of the rate."""

    monitor, monitor_mode = "val_accuracy", "max"

    def __init__(self, hidden: int = 8, encoder_lr_scale: float = 0.5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2)
        self.encoder_lr_scale = encoder_lr_scale

    def forward(self, bags: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.head(self.encoder(bag).max(0).values) for bag in bags])

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return (decay_groups(self.encoder.named_parameters(), weight_decay, lr_scale=self.encoder_lr_scale)
                + decay_groups(self.head.named_parameters(), weight_decay, lr_scale=1.0))

    def training_step(self, batch: Any) -> StepOutput:
        bags, y = batch
        return StepOutput(F.cross_entropy(self(bags), y), batch_size=len(bags))

    def validation_step(self, batch: Any) -> dict[str, Any]:
        bags, y = batch
        logits = self(bags)
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item(),
                "batch_size": len(bags)}


def _loaders(seed: int = 0) -> tuple[Any, Any]:
    kw = dict(seed=seed, collate_fn=collate_bags)
    return build_loader(Bags(48, 1), 8, train=True, **kw), build_loader(Bags(16, 2), 8, train=False, **kw)


def _fit(out: Path, resume: Path | None = None) -> Path:
    run = open_run("train", out, None, TOY_OPTIONS, resume, name="mil")
    torch.manual_seed(run.seed)
    objective = TOYS.build("max-pool-mil", hidden=8)
    train, val = _loaders(run.seed)
    run.fit(objective, train, val, tables={"splits.csv": pd.DataFrame({"bag": range(48), "split": "train"})})
    return run.dir


def test_a_mil_task_trains_through_the_shared_lifecycle(tmp_path: Path) -> None:
    train, _ = _loaders()
    bags, y = next(iter(train))
    assert len(bags) == 8 and len({b.shape[0] for b in bags}) > 1 and y.shape == (8,)  # ragged bags, one batch

    run = open_run("train", tmp_path / "runs", None, TOY_OPTIONS, None, name="mil")
    assert run.dir is None and not (tmp_path / "runs").exists()  # nothing is written before fit
    torch.manual_seed(0)
    objective = TOYS.build("max-pool-mil")
    trainer = run.fit(objective, *_loaders(), tables={"splits.csv": pd.DataFrame({"bag": [0, 1]})})
    for name in ("config.yaml", "splits.csv", "history.csv", "curves.png", "best.pt", "last.pt"):
        assert (run.dir / name).is_file(), name
    assert len(list((run.dir / "checkpoints").glob("epoch_*.pt"))) == 1
    assert yaml.safe_load((run.dir / "config.yaml").read_text()) == run.cfg
    history = pd.read_csv(run.dir / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3] and {"val_loss", "val_accuracy"} <= set(history.columns)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_accuracy"].max() > 0.75  # chance is 0.5
    # the objective's own groups: the encoder learns at half the head's rate
    enc, head = (g for g in trainer.optimizer.param_groups if g["weight_decay"] > 0)
    assert enc["lr"] == pytest.approx(0.5 * head["lr"]) and head["lr"] == pytest.approx(trainer.current_lr())
    best = load_checkpoint(run.dir / "best.pt")  # plain data, weights_only=True
    assert best["config"] == run.cfg and best["backbone"] is None and best["backbone_spec"] is None
    assert best["history"][-1]["val_accuracy"] == pytest.approx(history["val_accuracy"].iloc[best["epoch"] - 1])


def test_an_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _fit(tmp_path / "a")
    original = Trainer._end_epoch

    def crash_after_first(self: Trainer, row: dict[str, float]) -> None:
        original(self, row)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b")
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    (broken,) = list((tmp_path / "b").iterdir())
    torch.manual_seed(123)  # the resumed run restores its own random state from last.pt
    assert _fit(tmp_path / "unused", resume=broken) == broken
    assert not (tmp_path / "unused").exists()
    h_full = pd.read_csv(full / "history.csv").drop(columns="epoch_time_s")
    h_res = pd.read_csv(broken / "history.csv").drop(columns="epoch_time_s")
    pd.testing.assert_frame_equal(h_full, h_res)


def test_resume_refuses_other_configs_and_other_tasks(tmp_path: Path) -> None:
    run = _fit(tmp_path)
    before = (run / "history.csv").read_text()
    with pytest.raises(LeukolabError, match=r"different config: optim\.lr=0\.5 \(the run has 0\.05\)"):
        open_run("train", None, None, {"optim.lr": 0.5}, run, name="x")
    with pytest.raises(LeukolabError, match="is not a leukolab pretrain run"):
        open_run("pretrain", None, None, {}, run, name="x")
    with pytest.raises(LeukolabError, match=r"has no config\.yaml"):
        open_run("train", None, None, {}, tmp_path, name="x")
    assert (run / "history.csv").read_text() == before


def test_bad_options_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    with pytest.raises(LeukolabError, match=r"unknown config key 'optim\.nope'"):
        open_run("train", out, None, {"optim.nope": 1}, None, name="x")

    def prepare(cfg: dict[str, Any]) -> None:
        raise LeukolabError(f"data path {cfg['data']['path']} is bad")

    with pytest.raises(LeukolabError, match="data path None is bad"):
        open_run("train", out, None, {}, None, name="x", prepare=prepare)
    run = open_run("train", None, None, {}, None, name=lambda cfg: f"n{cfg['seed']}")
    assert run.name == "n0" and set(run.cfg) == set(load_defaults("train"))
    with pytest.raises(LeukolabError, match="no --out folder"):
        run.create()
    assert not out.exists()


def test_registries_build_by_name_and_list_the_choices() -> None:
    assert PRETRAIN_METHODS.names() == ["ae", "dino", "mae"] and "classification" in OBJECTIVES
    with pytest.raises(LeukolabError, match=r"^unknown method 'simclr'; expected one of: ae, dino, mae$"):
        PRETRAIN_METHODS.build("simclr")
    reg: Registry[Any] = Registry("widget")
    view = reg.subset("round")
    reg.register("cog", tags=("round",))(lambda size=1: ("cog", size))
    reg.register("brick")(lambda: "brick")
    assert reg.build("cog", size=3) == ("cog", 3) and view.names() == ["cog"] and "brick" not in view
    with pytest.raises(LeukolabError, match="unknown round widget 'brick'; expected one of: cog"):
        view.get("brick")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("cog")(lambda: None)
    with pytest.raises(TypeError, match="full registry"):
        view.register("wheel")


SRC = Path(__file__).resolve().parents[1] / "src" / "leukolab"


@pytest.mark.parametrize(
    ("where", "forbidden"),
    [
        ("objectives", ("training", "pipelines", "cli", "evaluation")),
        ("losses", ("models", "objectives", "training", "pipelines", "cli", "evaluation")),
        ("models/mae.py", ("losses", "objectives", "training", "pipelines", "cli", "evaluation")),
        ("models/dino.py", ("losses", "objectives", "training", "pipelines", "cli", "evaluation")),
        ("models/classifier.py", ("objectives", "training", "pipelines", "cli", "evaluation")),
        ("training", ("pipelines", "cli", "evaluation")),
    ],
)
def test_lower_layers_never_import_higher_ones(where: str, forbidden: tuple[str, ...]) -> None:
    import ast

    root = SRC / where
    files = [f for f in (sorted(root.glob("*.py")) if root.is_dir() else [root]) if f.name != "__init__.py"]
    assert files
    bad = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad |= {f"{f.name}: {n}" for n in names if n.startswith("leukolab.") and n.split(".")[1] in forbidden}
    assert not bad, sorted(bad)
