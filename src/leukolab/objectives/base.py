"""The contract between a task and the one training loop.

An :class:`Objective` owns the networks of a task (classifier, MAE, DINO
student/teacher, detector, MIL model ...) and says what the loss of a batch is,
what a validation batch yields and how those outputs add up, and which
parameters the optimiser gets. :class:`leukolab.training.loop.Trainer` does
everything else: device, AdamW, warm-up + cosine schedule, gradient
accumulation, AMP on GPU, DDP, the validation loop, checkpoints, resume,
history and progress bar. A new objective is one module that subclasses this,
keeps networks in ``models/`` and loss math in ``losses/``, and registers itself
in :data:`leukolab.registry.OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import BackboneSpec


@dataclass
class StepOutput:
    """What a training step returns: the loss to back-propagate, scalars to log and the batch size."""

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


def backbone_fields(spec: BackboneSpec) -> dict[str, Any]:
    """The backbone entries checkpoints carried before ``backbone_spec`` (``backbone_name``, ``img_size``,
    ``backbone_kwargs``, ``registers``), still written because older tools read them."""
    return {"backbone_name": spec.name, "img_size": spec.img_size, "backbone_kwargs": dict(spec.kwargs),
            "registers": int(spec.kwargs.get("reg_tokens", 0))}


class Objective(nn.Module):
    """Base class of every trainable task.

    Subclasses implement :meth:`training_step` and :meth:`validation_step`; the
    other hooks have sensible defaults. The Trainer moves each batch to the
    device before calling a step; validation runs under ``no_grad`` (and
    autocast on GPU) with the same random draws every epoch.
    """

    #: name of the validation scalar used to pick ``best.pt`` and its direction (``min`` or ``max``;
    #: ``last``: no scalar ranks the epochs, so ``best.pt`` is always the latest epoch)
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    #: under DDP: True when some trainable parameters get no gradient in some steps
    ddp_find_unused_parameters: bool = False

    def training_step(self, batch: Any) -> StepOutput:
        """Loss of one training batch (already on the right device)."""
        raise NotImplementedError

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Per-batch validation outputs (detached, on the CPU), gathered by :meth:`validation_epoch_end`.

        The default :meth:`validation_epoch_end` expects scalars plus ``batch_size``.
        """
        raise NotImplementedError

    def validation_epoch_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """``val_<key>``: the batch-size-weighted mean of every scalar the validation steps returned."""
        count = sum(int(o.get("batch_size", 1)) for o in outputs)
        sums: dict[str, float] = {}
        for o in outputs:
            n = int(o.get("batch_size", 1))
            for k, v in o.items():
                if k != "batch_size":
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        return {f"val_{k}": v / max(1, count) for k, v in sums.items()}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser groups of the trainable parameters: no weight decay on biases, norms and tokens.

        A group may carry ``lr_scale``: its learning rate is that share of the base rate.
        """
        return decay_groups(self.named_parameters(), weight_decay)

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (e.g. EMA teacher update)."""

    def on_epoch_end(self, epoch: int, run_dir: Path, device: torch.device) -> None:
        """Called on the writing process after each epoch's checkpoints."""

    def export_backbone(self) -> dict[str, torch.Tensor] | None:
        """The backbone's weights in timm naming, stored as ``backbone`` in checkpoints."""
        return None

    def backbone_spec(self) -> BackboneSpec | None:
        """How to rebuild :meth:`export_backbone`'s network, stored as ``backbone_spec``."""
        return None

    def checkpoint_extras(self) -> dict[str, Any]:
        """Extra plain-data metadata stored in every checkpoint (task, class names ...)."""
        return {}


class PretrainObjective(Objective):
    """An objective ``leukolab pretrain`` can run: built from the ``model:`` backbone options plus its own config
    section, it also says which image transforms make its batches (registered with ``tags=("pretrain",)``)."""

    def transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(train, validation)`` transforms of a PIL image into what :meth:`training_step` expects."""
        raise NotImplementedError
