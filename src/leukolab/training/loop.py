"""The one training loop, shared by classification, MAE, DINO and later tasks.

:class:`Trainer` runs any :class:`~leukolab.objectives.base.Objective`:
AdamW over the objective's own parameter groups, warm-up + cosine schedule,
gradient accumulation, gradient clipping, autocast on CUDA (never on CPU, where
bf16 is ~80x slower), the validation loop (the objective's ``validation_step``
per batch, then ``validation_epoch_end``), best-by-validation and last
checkpoints, keep-last-N per-epoch checkpoints, exact resume, a
``history.csv`` per epoch, epoch callbacks (figures) and a tqdm progress bar.
Batches may be anything :func:`move_to` can move (tensors nested in lists,
tuples and dicts), so detection targets and MIL bags train here too.

Checkpoints hold plain data only (:func:`leukolab.checkpoints.save_checkpoint`)
and are read back with ``weights_only=True`` (:func:`leukolab.checkpoints.load_checkpoint`).

Multi-GPU runs use ``torchrun`` + DDP: when ``WORLD_SIZE`` > 1 the process joins
the group (:mod:`leukolab.training.distributed`), every training step goes
through :class:`~torch.nn.parallel.DistributedDataParallel` (which averages the
gradients over the ranks) and only rank 0 writes files.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from leukolab.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from leukolab.errors import LeukolabError
from leukolab.objectives.base import Objective, StepOutput
from leukolab.training import distributed
from leukolab.training.schedule import warmup_cosine
from leukolab.utils.files import atomic_write, link_or_copy
from leukolab.utils.progress import progress

#: called on the writing process after every epoch's checkpoints: ``callback(epoch, run_dir)``
EpochCallback = Callable[[int, Path], None]


@dataclass
class TrainerConfig:
    """Knobs of the loop (the ``optim:`` and ``train:`` sections of a config)."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    amp: str = "auto"  # auto | off | bf16 | fp16
    keep_last: int = 2
    device: str = "auto"
    progress: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TrainerConfig:
        """Pick the loop's fields out of a resolved config with ``optim``/``train`` sections."""
        merged = {**cfg.get("optim", {}), **cfg.get("train", {}), "seed": cfg.get("seed", 0)}
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in merged.items() if k in fields})


def pick_device(name: str = "auto") -> torch.device:
    """``cuda`` when available for ``auto``, else the named device (under torchrun: this rank's GPU)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LeukolabError(f"device {name!r} requested but no CUDA GPU is available; expected cpu or auto")
    return torch.device(name)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move tensors (possibly nested in lists/tuples/dicts) to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


class _Step(nn.Module):
    """What DDP wraps: its forward is the objective's training step (so DDP sees every step)."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective
        self.last: StepOutput | None = None

    def forward(self, batch: Any) -> torch.Tensor:
        self.last = self.objective.training_step(batch)
        return self.last.loss


class Trainer:
    """Runs an :class:`Objective` for a number of epochs, writing into ``run_dir``.

    ``meta`` (plain data: the run's config ...) is stored in every checkpoint;
    ``callbacks`` run on the writing process after every epoch.
    """

    def __init__(self, objective: Objective, config: TrainerConfig, run_dir: Path, meta: dict[str, Any] | None = None,
                 callbacks: Sequence[EpochCallback] = ()) -> None:
        if config.grad_accum < 1:
            raise LeukolabError(f"grad_accum {config.grad_accum} must be >= 1")
        if config.epochs < 1:
            raise LeukolabError(f"epochs {config.epochs} must be >= 1")
        self.config = config
        self.run_dir = Path(run_dir)
        self.meta = meta or {}
        self.callbacks = list(callbacks)
        distributed.init_distributed(config.device)
        self.world_size = distributed.world_size()
        self.rank = distributed.rank()
        self.device = pick_device(config.device)
        self.objective = objective.to(self.device)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                _Step(self.objective), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=objective.ddp_find_unused_parameters,
            )
        groups = self.objective.parameter_groups(config.weight_decay)
        for group in groups:  # layer-wise decay etc.: a group's rate is a share of the base rate
            if "lr_scale" in group:
                group["lr"] = config.lr * float(group.pop("lr_scale"))
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.amp_dtype = self._amp_dtype(config.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.step = 0
        self.best: float | None = None
        self.scheduler: Any = None

    # ------------------------------------------------------------------ setup
    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp not in {"auto", "off", "bf16", "fp16"}:
            raise LeukolabError(f"amp {amp!r} is not one of auto, off, bf16, fp16")
        if self.device.type != "cuda" or amp == "off":
            return None
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _build_scheduler(self, steps_per_epoch: int) -> None:
        total = max(1, math.ceil(steps_per_epoch / self.config.grad_accum) * self.config.epochs)
        warmup = round(self.config.warmup_epochs * steps_per_epoch / self.config.grad_accum)
        self.scheduler = warmup_cosine(self.optimizer, min(warmup, total - 1), total, self.config.min_lr_ratio)
        self.total_steps = total

    def current_lr(self) -> float:
        """The base learning rate now (the largest of the groups' rates)."""
        return max(float(g["lr"]) for g in self.optimizer.param_groups)

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    # --------------------------------------------------------------- training
    def fit(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None) -> list[dict[str, float]]:
        """Train from the current epoch up to ``config.epochs``; returns the history."""
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        if steps_per_epoch == 0:
            raise LeukolabError("the training set is empty; expected at least one batch")
        if self.scheduler is None:
            self._build_scheduler(steps_per_epoch)
        if self._pending_scheduler_state is not None:
            self.scheduler.load_state_dict(self._pending_scheduler_state)
            self._pending_scheduler_state = None
            # building the scheduler reset the learning rate to step 0's; put back the resumed one
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        while self.epoch < self.config.epochs:
            t0 = time.perf_counter()
            self._seed_epoch(train_loader)
            train_logs = self._train_epoch(train_loader, steps_per_epoch)
            row: dict[str, float] = {"epoch": self.epoch + 1, **train_logs}
            if val_loader is not None:
                row.update(self.validate(val_loader))
            row["lr"] = self.current_lr()
            row["epoch_time_s"] = time.perf_counter() - t0
            self.history.append(row)
            self.epoch += 1
            if self.is_main:
                self._end_epoch(row)
        distributed.barrier()
        return self.history

    _pending_scheduler_state: dict[str, Any] | None = None

    @torch.no_grad()
    def validate(self, loader: Iterable[Any]) -> dict[str, float]:
        """The objective's validation scalars over ``loader``.

        Each batch goes to the device and through ``validation_step`` (no grad,
        autocast on GPU); ``validation_epoch_end`` adds them up. The CPU random
        generator is seeded with 0 for the pass and restored after it, so random
        views (DINO's crops) are the same every epoch and training is unaffected.
        """
        self.objective.eval()
        outputs = []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            for batch in loader:
                batch = move_to(batch, self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs.append(self.objective.validation_step(batch))
        return self.objective.validation_epoch_end(outputs)

    def _seed_epoch(self, loader: Any) -> None:
        """Shuffle order depends on (seed, epoch) only, so a resumed run sees the same batches."""
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(self.config.seed * 100003 + self.epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)

    def _train_epoch(self, loader: Iterable[Any], steps_per_epoch: int) -> dict[str, float]:
        self.objective.train()
        sums: dict[str, float] = {}
        count = 0
        accum = self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        bar = progress(
            loader, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", enable=self.config.progress and self.is_main,
            total=steps_per_epoch,
        )
        for i, batch in enumerate(bar):
            batch = move_to(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if self.ddp is not None:
                    loss = self.ddp(batch)  # DDP averages the gradients of this loss over the ranks
                    out = self.ddp.module.last
                else:
                    out = self.objective.training_step(batch)
                    loss = out.loss
            if not torch.isfinite(loss):
                raise LeukolabError(
                    f"loss became {loss.item()} at epoch {self.epoch + 1}, step {i + 1}; "
                    "expected a finite loss (try a lower --lr)"
                )
            last_in_epoch = i + 1 == steps_per_epoch
            # scale so that a partial accumulation window at the end of an epoch still averages correctly
            window = accum if (i // accum + 1) * accum <= steps_per_epoch else steps_per_epoch % accum
            self.scaler.scale(loss / window).backward()
            if (i + 1) % accum == 0 or last_in_epoch:
                self._optimizer_step()
            n = out.batch_size
            count += n
            sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item() * n
            for k, v in out.logs.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + float(v) * n
            if hasattr(bar, "set_postfix"):
                lr = self.current_lr()
                bar.set_postfix(loss=f"{sums['train_loss'] / count:.4f}", lr=f"{lr:.2e}")
        return {k: v / max(1, count) for k, v in sums.items()}

    def _optimizer_step(self) -> None:
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.config.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.objective.on_train_step_end(self.step, self.total_steps)

    # ------------------------------------------------------------ checkpoints
    def _improved(self, row: dict[str, float]) -> bool:
        key, mode = self.objective.monitor, self.objective.monitor_mode
        if mode == "last":  # no validation scalar ranks the epochs: best.pt is the latest epoch
            self.best = float(self.epoch)
            return True
        value = row.get(key, row.get("train_loss"))
        if key not in row:
            mode = "min"
        if value is None or not math.isfinite(value):
            return False
        if self.best is None or (value < self.best if mode == "min" else value > self.best):
            self.best = float(value)
            return True
        return False

    def _end_epoch(self, row: dict[str, float]) -> None:
        history = pd.DataFrame(self.history)
        atomic_write(self.run_dir / "history.csv", lambda tmp: history.to_csv(tmp, index=False), overwrite=True)
        improved = self._improved(row)
        state = self.state_dict()
        last = save_checkpoint(state, self.run_dir / "last.pt")
        if improved:
            save_checkpoint(self._weights_only(state), self.run_dir / "best.pt")
        if self.config.keep_last > 0:
            ckpt_dir = self.run_dir / "checkpoints"
            # the epoch snapshot is exactly last.pt: a hard link, not a second copy on disk
            link_or_copy(last, ckpt_dir / f"epoch_{self.epoch:04d}.pt")
            for old in sorted(ckpt_dir.glob("epoch_*.pt"))[: -self.config.keep_last]:
                old.unlink()
        self.objective.on_epoch_end(self.epoch, self.run_dir, self.device)
        for callback in self.callbacks:
            callback(self.epoch, self.run_dir)

    @staticmethod
    def _weights_only(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k not in {"optimizer", "scheduler", "scaler", "rng"}}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain data), plus the backbone in timm naming and its spec."""
        spec = self.objective.backbone_spec()
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "monitor": self.objective.monitor,
            "objective": self.objective.state_dict(),
            "backbone": self.objective.export_backbone(),
            "backbone_spec": spec.to_dict() if spec is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "trainer_config": asdict(self.config),
            "rng": rng_state(),
            **self.meta,
            **self.objective.checkpoint_extras(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` written by an earlier, interrupted run."""
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending_scheduler_state = state.get("scheduler")
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best = state.get("best")
        self.history = list(state.get("history", []))
        if state.get("rng"):
            set_rng_state(state["rng"])

    def resume(self, path: Path) -> None:
        """Resume from ``path`` (``last.pt`` of an interrupted run)."""
        if not path.is_file():
            raise LeukolabError(f"cannot resume: {path} does not exist; expected the last.pt of an earlier run")
        try:
            state = load_checkpoint(path)
        except LeukolabError as exc:
            raise LeukolabError(f"cannot resume from {path}: {exc} (checkpoints written before "
                                f"{CHECKPOINT_FORMAT} cannot be resumed; start a new run)") from None
        try:
            self.load_state_dict(state)
        except LeukolabError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise LeukolabError(f"cannot resume from {path} ({exc.__class__.__name__}: {first})") from None


def rng_state() -> dict[str, Any]:
    """The torch, NumPy and Python random states as plain data (tensors, numbers, lists)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
