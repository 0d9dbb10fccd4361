"""DINO self-distillation (Caron et al. 2021): the batch -> loss glue, teacher EMA and schedules.

Networks and the ``dino:`` config: :mod:`leukolab.models.dino`; losses: :class:`~leukolab.losses.dino_loss.DINOLoss`
(it owns the centre) and :func:`~leukolab.losses.koleo_loss.koleo_loss`. The teacher sees the global crops, the
student every crop; after every optimiser step the teacher becomes an EMA of the student (momentum rising on a
cosine to 1). The teacher temperature warms up linearly over the first ``teacher_temp_warmup_ratio`` of the steps,
the prototypes stay frozen for the first ``freeze_last_layer_ratio``. The exported backbone is the teacher's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from leukolab.checkpoints import BackboneSpec
from leukolab.data.multicrop import MultiCropTransform
from leukolab.errors import LeukolabError
from leukolab.losses.dino_loss import DINOLoss
from leukolab.losses.koleo_loss import koleo_loss
from leukolab.models.backbones import is_vit
from leukolab.models.dino import DINOConfig, DINOHead, MultiCropNet, dino_backbone
from leukolab.models.ema import cosine_momentum, ema_update_
from leukolab.models.spec import describe_backbone
from leukolab.objectives.base import PretrainObjective, StepOutput, backbone_fields
from leukolab.registry import OBJECTIVES


@OBJECTIVES.register("dino", tags=("pretrain",))
class DINOObjective(PretrainObjective):
    """DINO on multi-crop batches; ``options`` is the ``dino:`` config section."""

    ddp_find_unused_parameters = True  # the prototype layer gets no gradient while it is frozen

    def __init__(self, backbone: str, img_size: int, backbone_kwargs: dict[str, Any] | None = None,
                 drop_path: float = 0.0, **options: Any) -> None:
        super().__init__()
        c = self.config = DINOConfig(**options)
        self.img_size = int(img_size)
        kwargs = dict(backbone_kwargs or {})
        student = dino_backbone(backbone, img_size, drop_path, kwargs)
        teacher = dino_backbone(backbone, img_size, 0.0, kwargs)
        patch = student.patch_embed.patch_size[0] if is_vit(student) else 1
        if c.local_crops > 0 and c.local_size % patch:
            raise LeukolabError(f"local crop size {c.local_size} is not a multiple of {backbone}'s patch size {patch}")
        head = DINOHead(int(student.num_features), c.out_dim, c.hidden_dim, c.bottleneck_dim)
        self.student = MultiCropNet(student, head)
        self.teacher = MultiCropNet(teacher, copy.deepcopy(head))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.criterion = DINOLoss(c.out_dim, c.student_temp, c.center_momentum, c.n_global)
        self.spec = describe_backbone(teacher, backbone, self.img_size, kwargs)
        # optimiser steps done / planned, saved so that a resumed run continues the schedules
        self.register_buffer("progress_steps", torch.zeros(2, dtype=torch.long))

    def transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(train, validation)`` transforms: the same multi-crop views (validation sees fixed random draws)."""
        c = self.config
        views = MultiCropTransform(self.img_size, c.local_size, c.local_crops, c.global_scale, c.local_scale, c.jitter)
        return views, views

    def current_teacher_temp(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` (the start value before step 1)."""
        c, (step, total) = self.config, self.progress_steps.tolist()
        warm = c.teacher_temp_warmup_ratio * total
        if c.teacher_temp_warmup_ratio > 0 and (total == 0 or step < warm):
            frac = step / warm if warm > 0 else 0.0
            return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * frac
        return c.teacher_temp

    def prototypes_frozen(self) -> bool:
        """True during the first ``freeze_last_layer_ratio`` of training (DINO's freeze_last_layer)."""
        step, total = self.progress_steps.tolist()
        ratio = self.config.freeze_last_layer_ratio
        return ratio > 0 and (total == 0 or step < ratio * total)

    def _loss(self, batch: Any, update_center: bool) -> tuple[torch.Tensor, dict[str, float], int]:
        views = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
        n_global = self.config.n_global
        if not isinstance(views, (list, tuple)) or len(views) < n_global:
            raise LeukolabError("DINO needs multi-crop batches (a list of views); use leukolab.data.multicrop")
        with torch.no_grad():
            _, teacher_out = self.teacher(list(views[:n_global]))
        feats, student_out = self.student(list(views), self.prototypes_frozen())
        loss, probs = self.criterion(student_out, teacher_out, self.current_teacher_temp())
        logs = {"dino_loss": float(loss.detach())}
        if self.config.koleo_weight > 0:
            b = views[0].shape[0]
            kl = sum(koleo_loss(f) for f in feats[: n_global * b].chunk(n_global)) / n_global
            logs["koleo"] = float(kl.detach())
            loss = loss + self.config.koleo_weight * kl
        with torch.no_grad():
            logs["teacher_entropy"] = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        if update_center:
            self.criterion.update_center(teacher_out)
        return loss, logs, int(views[0].shape[0])

    def training_step(self, batch: Any) -> StepOutput:
        loss, logs, b = self._loss(batch, update_center=True)
        return StepOutput(loss, {**logs, "teacher_temp": self.current_teacher_temp()}, batch_size=b)

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """DINO loss and teacher entropy, the centre untouched."""
        loss, logs, b = self._loss(batch, update_center=False)
        return {"loss": float(loss.detach()), "teacher_entropy": logs["teacher_entropy"], "batch_size": b}

    @torch.no_grad()
    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher with the cosine momentum of ``step``."""
        self.progress_steps[0], self.progress_steps[1] = step, total_steps
        ema_update_(self.teacher, self.student, cosine_momentum(step, total_steps, self.config.momentum))

    def train(self, mode: bool = True) -> DINOObjective:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        return self

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.teacher.backbone.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        return self.spec

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "pretrain-dino", **backbone_fields(self.spec)}
