"""DINO self-distillation (Caron et al. 2021) with optional register tokens and KoLeo.

Student and teacher are the same timm backbone (a ViT, optionally with
``reg_tokens``; convolutional nets work too) followed by a DINO projection head
(3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes with
unit norm, i.e. weight norm with the gain fixed to 1). The teacher is never
trained: after every optimiser step it becomes an EMA of the student with a
momentum rising on a cosine from ``momentum`` (0.996) to 1 over the total steps.

Batches are multi-crop views from :class:`leukolab.data.multicrop.MultiCropTransform`:
the teacher sees the 2 global crops, the student all crops, and the loss is the
cross-entropy between the teacher's centred, sharpened distribution of one
global crop and the student's distribution (temperature ``student_temp``) of
every other crop. The centre is an EMA (``center_momentum``) of the mean teacher
output, updated by every training batch; the teacher temperature warms up
linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
``teacher_temp_warmup_ratio`` of the steps. ``koleo_weight`` > 0 adds the KoLeo
spreading term of DINOv2 on the student's pooled features of the global crops.

A ViT student runs on crops of any size (timm ``dynamic_img_size``, which does
not change the weights), so local crops are cheaper than global ones.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone, is_vit
from leukolab.objectives.base import Objective, StepOutput
from leukolab.registry import OBJECTIVES


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity with ``out_dim`` unit-norm prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        w = self.prototypes.detach() if freeze_prototypes else self.prototypes
        return F.linear(z, F.normalize(w, dim=-1, eps=1e-6))


class DINONet(nn.Module):
    """Backbone + DINO head, run once per crop resolution (DINO's multi-crop wrapper)."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], freeze_prototypes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features, head outputs)`` of all crops, concatenated in crop order."""
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end]) if end - start > 1 else crops[start]))
            start = end
        f = torch.cat(feats) if len(feats) > 1 else feats[0]
        return f, self.head(f, freeze_prototypes)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum after optimiser step ``step`` (1-based): ``base`` at 0, 1 at ``total_steps``."""
    frac = min(1.0, max(0.0, step / max(1, total_steps)))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2): ``-mean log`` nearest-neighbour distance of L2-normalised rows."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    dist_nn = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


def _build_backbone(name: str, img_size: int, drop_path: float, kwargs: dict[str, Any]) -> nn.Module:
    model = create_backbone(name, img_size, drop_path, **kwargs)
    if is_vit(model) and not getattr(model, "dynamic_img_size", False):
        try:  # any crop size through the same weights (the state dict is unchanged)
            model = create_backbone(name, img_size, drop_path, dynamic_img_size=True, **kwargs)
        except LeukolabError:
            pass
    return model


@OBJECTIVES.register("dino")
class DINOObjective(Objective):
    """DINO on multi-crop batches; the exported backbone is the teacher's."""

    monitor = "val_loss"
    monitor_mode = "min"
    ddp_find_unused_parameters = True  # the prototype layer gets no gradient while it is frozen

    def __init__(
        self,
        backbone: str,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        out_dim: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_ratio: float = 0.3,
        momentum: float = 0.996,
        center_momentum: float = 0.9,
        koleo_weight: float = 0.0,
        freeze_last_layer_ratio: float = 0.0,
        drop_path: float = 0.0,
        n_global: int = 2,
        extras: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise LeukolabError(f"teacher momentum {momentum} is outside [0, 1]; expected e.g. 0.996")
        self.backbone_name = backbone
        self.img_size = int(img_size)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        student_backbone = _build_backbone(backbone, img_size, drop_path, self.backbone_kwargs)
        teacher_backbone = _build_backbone(backbone, img_size, 0.0, self.backbone_kwargs)
        dim = int(student_backbone.num_features)
        self.student = DINONet(student_backbone, DINOHead(dim, out_dim, hidden_dim, bottleneck_dim))
        self.teacher = DINONet(teacher_backbone, copy.deepcopy(self.student.head))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_temp_warmup_ratio = float(teacher_temp_warmup_ratio)
        self.base_momentum = float(momentum)
        self.center_momentum = float(center_momentum)
        self.koleo_weight = float(koleo_weight)
        self.freeze_last_layer_ratio = float(freeze_last_layer_ratio)
        self.n_global = int(n_global)
        self.extras = extras or {}
        self.register_buffer("center", torch.zeros(1, out_dim))
        # optimiser steps done / planned, saved so a resumed run continues the schedules
        self.register_buffer("progress_steps", torch.zeros(2, dtype=torch.long))

    # ------------------------------------------------------------------ schedules
    @property
    def step(self) -> int:
        return int(self.progress_steps[0])

    @property
    def total_steps(self) -> int:
        return int(self.progress_steps[1])

    def current_teacher_temp(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` (the start value before step 1)."""
        if self.teacher_temp_warmup_ratio <= 0:
            return self.teacher_temp
        warm = self.teacher_temp_warmup_ratio * self.total_steps
        if self.total_steps == 0 or self.step < warm:
            frac = self.step / warm if warm > 0 else 0.0
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * frac
        return self.teacher_temp

    def prototypes_frozen(self) -> bool:
        """True during the first ``freeze_last_layer_ratio`` of training (DINO's freeze_last_layer)."""
        if self.freeze_last_layer_ratio <= 0:
            return False
        return self.total_steps == 0 or self.step < self.freeze_last_layer_ratio * self.total_steps

    # ------------------------------------------------------------------ loss
    def dino_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_views: int, teacher_temp: float,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, teacher probabilities)``: mean cross-entropy over (global teacher crop, other crop) pairs."""
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_views)
        probs = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        targets = probs.chunk(self.n_global)
        total = student_out.new_zeros((), dtype=torch.float32)
        pairs = 0
        for iq, q in enumerate(targets):
            for v in range(n_views):
                if v == iq:
                    continue
                total = total + torch.sum(-q * logp[v], dim=-1).mean()
                pairs += 1
        return total / pairs, probs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher_out)`` (averaged over processes under DDP)."""
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)

    def _views(self, batch: Any) -> list[torch.Tensor]:
        views = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
        if not isinstance(views, (list, tuple)) or len(views) < self.n_global:
            raise LeukolabError("DINO needs multi-crop batches (a list of views); use leukolab.data.multicrop")
        return list(views)

    def compute(self, batch: Any, update_center: bool) -> tuple[torch.Tensor, dict[str, float], int]:
        views = self._views(batch)
        temp = self.current_teacher_temp()
        with torch.no_grad():
            _, teacher_out = self.teacher(views[: self.n_global])
        feats, student_out = self.student(views, self.prototypes_frozen())
        loss, probs = self.dino_loss(student_out, teacher_out, len(views), temp)
        logs = {"dino_loss": float(loss.detach())}
        if self.koleo_weight > 0:
            b = views[0].shape[0]
            kl = sum(koleo_loss(f) for f in feats[: self.n_global * b].chunk(self.n_global)) / self.n_global
            logs["koleo"] = float(kl.detach())
            loss = loss + self.koleo_weight * kl
        with torch.no_grad():
            logs["teacher_entropy"] = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        if update_center:
            self.update_center(teacher_out)
        return loss, logs, int(views[0].shape[0])

    # ------------------------------------------------------------------ Objective
    def training_step(self, batch: Any) -> StepOutput:
        loss, logs, b = self.compute(batch, update_center=True)
        logs["teacher_temp"] = self.current_teacher_temp()
        return StepOutput(loss, logs, batch_size=b)

    @torch.no_grad()
    def validate(self, loader: Any, device: torch.device) -> dict[str, float]:
        """DINO loss (teacher vs student, centre untouched) on the same crops every epoch."""
        from leukolab.training.loop import move_to

        self.eval()
        total, entropy, count = 0.0, 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for batch in loader:
                loss, logs, b = self.compute(move_to(batch, device), update_center=False)
                total += float(loss) * b
                entropy += logs["teacher_entropy"] * b
                count += b
        return {"val_loss": total / max(1, count), "val_teacher_entropy": entropy / max(1, count)}

    @torch.no_grad()
    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher with the cosine momentum of ``step``."""
        self.progress_steps[0] = step
        self.progress_steps[1] = total_steps
        m = cosine_momentum(step, total_steps, self.base_momentum)
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            tb.copy_(sb)

    def train(self, mode: bool = True) -> DINOObjective:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        return self

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.teacher.backbone.state_dict().items()}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {
            "backbone_name": self.backbone_name, "img_size": self.img_size,
            "backbone_kwargs": dict(self.backbone_kwargs), "registers": int(self.backbone_kwargs.get("reg_tokens", 0)),
            "task": "pretrain-dino", **self.extras,
        }
