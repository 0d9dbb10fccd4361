"""The contract between a task and the one training loop.

An :class:`Objective` owns the networks of a task (classifier, MAE
encoder/decoder, DINO student/teacher ...) and says what the loss of a batch
is. :class:`leukolab.training.loop.Trainer` does everything else: optimiser,
warm-up + cosine schedule, gradient accumulation, AMP on GPU, checkpoints,
resume, history and progress bar. A new objective is one new module that
subclasses this and registers itself in :data:`leukolab.registry.OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class StepOutput:
    """What a training step returns: the loss to back-propagate and scalars to log."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether a parameter gets weight decay: not biases, norms (1-D), tokens or position embeddings."""
    return not (p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name)


def decay_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, **extra: Any
) -> list[dict[str, Any]]:
    """The trainable ``named`` parameters as a decayed group and (if any) an undecayed one, ``extra`` in both."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **extra}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


class Objective(nn.Module):
    """Base class of every trainable task.

    Subclasses implement :meth:`training_step` and :meth:`validate`; the other
    hooks have sensible defaults.
    """

    #: name of the validation scalar used to pick ``best.pt`` and its direction
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    #: under DDP: True when some trainable parameters get no gradient in some steps
    ddp_find_unused_parameters: bool = False

    def training_step(self, batch: Any) -> StepOutput:
        """Loss of one training batch (already on the right device)."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, loader: Any, device: torch.device) -> dict[str, float]:
        """Scalars over a whole validation loader; keys should start with ``val_``."""
        raise NotImplementedError

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (e.g. EMA teacher update)."""

    def on_epoch_end(self, epoch: int, run_dir: Path, device: torch.device) -> None:
        """Called after validation each epoch (e.g. write reconstructions)."""

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters; no weight decay on biases, norms and tokens."""
        return decay_groups(self.named_parameters(), weight_decay)

    def export_backbone(self) -> dict[str, torch.Tensor] | None:
        """The backbone's weights in timm naming, stored as ``backbone`` in checkpoints."""
        return None

    def checkpoint_extras(self) -> dict[str, Any]:
        """Extra metadata stored in every checkpoint (class names, backbone name ...)."""
        return {}
