"""MixUp / CutMix of training batches into soft targets, with timm's implementation.

:class:`BatchMixer` wraps :class:`timm.data.Mixup` (``mode="batch"``: one mixing
coefficient per batch, each image mixed with the batch reversed) and gives soft
targets ``(N, C)`` whose rows sum to 1, label smoothing included (timm applies it
to the one-hot targets before mixing, so the loss must not smooth again).
It is applied to training batches only, by
:class:`~leukolab.objectives.classification.ClassificationObjective` (the
objective owns batch -> loss; the Trainer stays task-agnostic). The random
draws come from NumPy's global generator, which every checkpoint saves, so a
resumed run mixes exactly as an uninterrupted one.

timm's Mixup needs an even batch. Training loaders drop their last partial
batch, so an odd batch only happens with an odd ``--batch-size`` or a training
set smaller than one batch: then the first ``N - 1`` images are mixed and the
odd one out keeps its own (smoothed) one-hot target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from leukolab.errors import LeukolabError


@dataclass(frozen=True)
class MixConfig:
    """The ``mix:`` section of a train config.

    Attributes:
        mixup: MixUp's Beta(alpha, alpha) parameter (0 = no MixUp).
        cutmix: CutMix's Beta(alpha, alpha) parameter (0 = no CutMix).
        prob: probability that a batch is mixed at all.
        switch_prob: with both on, the probability that a mixed batch uses CutMix rather than MixUp.
    """

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> MixConfig:
        """Checked values of a ``mix:`` section (missing keys take the defaults, which mix nothing)."""
        section = dict(section or {})
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise LeukolabError(f"unknown mix key {unknown[0]!r}; expected one of: mixup, cutmix, prob, switch_prob")
        values = {}
        for key, value in section.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LeukolabError(f"mix.{key} {value!r} is not a number")
            values[key] = float(value)
        cfg = cls(**values)
        for key in ("mixup", "cutmix"):
            if getattr(cfg, key) < 0:
                raise LeukolabError(f"mix.{key} {getattr(cfg, key)} is negative; expected an alpha >= 0 (0 = off)")
        for key in ("prob", "switch_prob"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise LeukolabError(f"mix.{key} {getattr(cfg, key)} is outside [0, 1]")
        return cfg

    @property
    def enabled(self) -> bool:
        """Whether any batch gets mixed."""
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


class BatchMixer:
    """``(images, class indices) -> (mixed images, soft targets)`` for training batches.

    Args:
        config: the mixing options (must be :attr:`MixConfig.enabled`).
        num_classes: number of classes ``C`` of the soft targets.
        label_smoothing: applied to the one-hot targets before mixing (timm's convention:
            ``1 - eps + eps / C`` on the true class, ``eps / C`` elsewhere).
    """

    def __init__(self, config: MixConfig, num_classes: int, label_smoothing: float = 0.0) -> None:
        if not config.enabled:
            raise LeukolabError("mix: both mixup and cutmix are 0 (or prob is 0); nothing to mix")
        self.config = config
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.prob,
                           switch_prob=config.switch_prob, mode="batch", label_smoothing=self.label_smoothing,
                           num_classes=self.num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        even = n - n % 2
        if even == n:
            return self.mixup(x, y)
        tail = mixup_target(y[even:], self.num_classes, 1.0, self.label_smoothing)
        if even == 0:
            return x, tail
        head_x, head_y = self.mixup(x[:even], y[:even])
        return torch.cat([head_x, x[even:]]), torch.cat([head_y, tail])
