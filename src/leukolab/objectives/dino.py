"""DINO self-distillation (Caron et al. 2021): the batch -> loss glue, teacher EMA and schedules.

Networks and the ``dino:`` config: :mod:`leukolab.models.dino`; losses: :class:`~leukolab.losses.dino_loss.DINOLoss`
(it owns the centre) and :func:`~leukolab.losses.koleo_loss.koleo_loss`. The teacher sees the global crops, the
student every crop; after every optimiser step the teacher becomes an EMA of the student (momentum rising on a
cosine to 1). The teacher temperature warms up linearly over the first ``teacher_temp_warmup_ratio`` of the steps,
the prototypes stay frozen for the first ``freeze_last_layer_ratio``. The exported backbone is the teacher's.

DINOv2 options: ``ibot_weight`` > 0 adds the iBOT masked-patch loss
(:class:`~leukolab.losses.ibot_loss.IBOTPatchLoss`; the student's global crops are
masked, the teacher's are not), ``centering: sinkhorn`` balances the teacher targets
with Sinkhorn–Knopp instead of the running centre, ``koleo_weight`` spreads the CLS features.

Every training step logs diagnostics (:meth:`DINOLoss.diagnostics`: teacher and
student entropy, their KL, the centre's norm, the effective number of
prototypes; plus ``koleo``); after the teacher-temperature warm-up,
:meth:`DINOObjective.on_epoch_end` warns once on stderr when the epoch's teacher
output is still uniform or has collapsed onto one prototype.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import BackboneSpec
from leukolab.data.multicrop import BatchedMultiCrop, MultiCropTransform, MultiCropViews
from leukolab.errors import LeukolabError
from leukolab.losses.dino_loss import DINOLoss
from leukolab.losses.ibot_loss import IBOTPatchLoss
from leukolab.losses.koleo_loss import koleo_loss
from leukolab.models.backbones import is_vit
from leukolab.models.dino import DINOConfig, DINOHead, MultiCropNet, dino_backbone, num_patches, random_patch_masks
from leukolab.models.ema import cosine_momentum, ema_update_
from leukolab.models.spec import describe_backbone
from leukolab.objectives.base import PretrainObjective, StepOutput, backbone_fields
from leukolab.registry import OBJECTIVES

#: after the warm-up, an epoch's mean teacher entropy at or above this share of ln(K) reads as "still uniform"
UNIFORM_ENTROPY_SHARE = 0.95
#: after the warm-up, fewer effective prototypes than this (exp of the batch-mean target's entropy) is a collapse
MIN_EFFECTIVE_PROTOTYPES = 2.0


def collapse_warning(teacher_entropy: float, effective_prototypes: float, out_dim: int) -> str | None:
    """A one-line warning when an epoch's teacher output is still uniform or collapsed onto one prototype."""
    uniform = math.log(out_dim)
    if teacher_entropy >= UNIFORM_ENTROPY_SHARE * uniform:
        return (f"teacher output still uniform after the temperature warm-up (entropy {teacher_entropy:.2f}, "
                f"ln K = {uniform:.2f}): try a smaller dino.out_dim (256-4096), a lower dino.teacher_temp, "
                "a higher lr, a lower dino.momentum, dino.centering sinkhorn, or more steps")
    if effective_prototypes < MIN_EFFECTIVE_PROTOTYPES:
        return (f"teacher collapsed to one prototype (effective prototypes {effective_prototypes:.2f} of {out_dim}): "
                "try dino.centering sinkhorn, a lower dino.center_momentum, a higher dino.teacher_temp, "
                "dino.koleo_weight 0.1, or a lower lr")
    return None


@OBJECTIVES.register("dino", tags=("pretrain",))
class DINOObjective(PretrainObjective):
    """DINO on multi-crop batches; ``options`` is the ``dino:`` config section."""

    #: ``optim.base_lr`` when the config leaves it null (lr = base_lr * batch / 256; DINO's paper uses 5e-4)
    default_base_lr = 1e-3
    #: DINO's validation loss compares the student with a moving teacher (EMA, temperature warm-up, Sinkhorn or
    #: running-centre targets), so a low value early says nothing about the features: on PBC seed 2 it picked
    #: epoch 2 of 6, whose 20-NN probe (57.0) was below random weights (59.8); the last epoch gave 64.8. As in
    #: DINO, DINOv2 and solo-learn, the weights to use are the last ones.
    monitor = "epoch"
    monitor_mode = "last"
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
        ibot = c.ibot_weight > 0
        if ibot and not is_vit(student):
            raise LeukolabError(f"dino.ibot_weight {c.ibot_weight}: iBOT needs a Vision Transformer backbone "
                                f"(patch tokens), not {backbone}; set dino.ibot_weight 0")
        head = DINOHead(int(student.num_features), c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_batch_norm)
        patch_head = (DINOHead(int(student.num_features), c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_batch_norm)
                      if ibot and c.ibot_separate_head else None)
        self.student = MultiCropNet(student, head, ibot, patch_head)
        self.teacher = MultiCropNet(teacher, copy.deepcopy(head), ibot, copy.deepcopy(patch_head))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.criterion = DINOLoss(c.out_dim, c.student_temp, c.center_momentum, c.n_global, c.centering,
                                  c.sinkhorn_iterations)
        self.ibot_criterion = IBOTPatchLoss(c.out_dim, c.student_temp, c.center_momentum, c.centering,
                                            c.sinkhorn_iterations) if ibot else None
        # this process's sums of (teacher entropy, effective prototypes, steps) over the epoch, for on_epoch_end
        self._epoch_stats = [0.0, 0.0, 0]
        self._warned: set[str] = set()
        self.spec = describe_backbone(teacher, backbone, self.img_size, kwargs)
        #: the multi-crop views of the ``dino:`` section, the one options object of both transforms
        self.views = MultiCropViews(self.img_size, c.local_size, c.local_crops, c.global_scale, c.local_scale, c.jitter)
        # batched_crops: the dataset gives square images, the views are made here per batch (a plain attribute)
        self.multicrop = BatchedMultiCrop(self.views) if c.batched_crops else None
        # optimiser steps done / planned, saved so that a resumed run continues the schedules
        self.register_buffer("progress_steps", torch.zeros(2, dtype=torch.long))

    def transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(train, validation)`` transforms: the same multi-crop views (validation sees fixed random draws).

        With ``batched_crops`` both are :meth:`BatchedMultiCrop.base_transform` (square float images) and the
        views are made per batch in :meth:`_loss`, on the batch's device.
        """
        if self.multicrop is not None:
            base = self.multicrop.base_transform()
            return base, base
        views = MultiCropTransform(self.views)
        return views, views

    def current_teacher_temp(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` (the start value before step 1)."""
        c, (step, total) = self.config, self.progress_steps.tolist()
        warm = c.teacher_temp_warmup_ratio * total
        if c.teacher_temp_warmup_ratio > 0 and (total == 0 or step < warm):
            frac = step / warm if warm > 0 else 0.0
            return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * frac
        return c.teacher_temp

    def teacher_temp_warmed_up(self) -> bool:
        """True once the teacher temperature has reached ``teacher_temp`` (after its warm-up steps)."""
        step, total = self.progress_steps.tolist()
        return total > 0 and step >= self.config.teacher_temp_warmup_ratio * total

    def prototypes_frozen(self) -> bool:
        """True during the first ``freeze_last_layer_ratio`` of training (DINO's freeze_last_layer)."""
        step, total = self.progress_steps.tolist()
        ratio = self.config.freeze_last_layer_ratio
        return ratio > 0 and (total == 0 or step < ratio * total)

    def _loss(self, batch: Any, update_center: bool) -> tuple[torch.Tensor, dict[str, float], int]:
        if self.multicrop is not None:  # batched_crops: (images (B, 3, R, R), targets) -> multi-crop views
            pair = isinstance(batch, (list, tuple)) and len(batch) == 2 and torch.is_tensor(batch[1])
            images = batch[0] if pair and batch[1].dim() == 1 else batch
            if torch.is_tensor(images) and images.dim() == 4:
                batch = self.multicrop(images)
        views = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
        n_global = self.config.n_global
        if not isinstance(views, (list, tuple)) or len(views) < n_global:
            raise LeukolabError("DINO needs multi-crop batches (a list of views); use leukolab.data.multicrop")
        c, views, b = self.config, list(views), int(views[0].shape[0])
        temp, frozen = self.current_teacher_temp(), self.prototypes_frozen()
        masks = None
        if self.ibot_criterion is not None:
            n = num_patches(self.student.backbone, *views[0].shape[-2:])
            masks = random_patch_masks(n_global * b, n, c.ibot_mask_ratio, c.ibot_mask_probability, views[0].device)
            with torch.no_grad():
                _, teacher_out, teacher_patch = self.teacher.forward_ibot(views[:n_global], n_global, masks, False)
            feats, student_out, student_patch = self.student.forward_ibot(views, n_global, masks, True, frozen)
        else:
            with torch.no_grad():
                _, teacher_out = self.teacher(views[:n_global])
            feats, student_out = self.student(views, frozen)
        dino_loss, probs = self.criterion(student_out, teacher_out, temp)
        logs = {"dino_loss": float(dino_loss.detach()), **self.criterion.diagnostics(student_out, probs, dino_loss)}
        loss = dino_loss
        if b > 1:  # KoLeo needs a nearest neighbour; logged even when its weight is 0
            with torch.set_grad_enabled(torch.is_grad_enabled() and c.koleo_weight > 0):
                kl = sum(koleo_loss(f) for f in feats[: n_global * b].chunk(n_global)) / n_global
            logs["koleo"] = float(kl.detach())
            if c.koleo_weight > 0:
                loss = loss + c.koleo_weight * kl
        if masks is not None:
            ibot = self.ibot_criterion(student_patch, self.ibot_criterion.teacher_probs(teacher_patch, temp), masks)
            logs["ibot_loss"] = float(ibot.detach())
            loss = loss + c.ibot_weight * ibot
            if update_center:
                self.ibot_criterion.update_center(teacher_patch)
        if update_center:
            self.criterion.update_center(teacher_out)
        return loss, logs, b

    def training_step(self, batch: Any) -> StepOutput:
        loss, logs, b = self._loss(batch, update_center=True)
        stats = self._epoch_stats
        stats[0] += logs["teacher_entropy"]
        stats[1] += logs["effective_prototypes"]
        stats[2] += 1
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

    def on_epoch_end(self, epoch: int, run_dir: Path, device: torch.device) -> None:
        """Warn on stderr (one line, once per kind) when, after the warm-up, the epoch's teacher output is still
        uniform or has collapsed onto one prototype (:func:`collapse_warning`)."""
        entropy_sum, prototypes_sum, steps = self._epoch_stats
        self._epoch_stats = [0.0, 0.0, 0]
        if steps == 0 or not self.teacher_temp_warmed_up():
            return
        message = collapse_warning(entropy_sum / steps, prototypes_sum / steps, self.config.out_dim)
        kind = message.split(" (")[0] if message else None
        if message and kind not in self._warned:
            self._warned.add(kind)
            print(f"warning: epoch {epoch}: {message}", file=sys.stderr, flush=True)

    def train(self, mode: bool = True) -> DINOObjective:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        if mode:  # but a head BatchNorm normalises with the batch's statistics, as the student's does
            for m in self.teacher.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.train()
        return self

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.teacher.backbone.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        return self.spec

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "pretrain-dino", **backbone_fields(self.spec)}
