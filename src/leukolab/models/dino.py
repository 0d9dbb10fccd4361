"""DINO's networks (Caron et al. 2021): projection head, multi-crop wrapper, and the ``dino:`` config.

Student and teacher are each a timm backbone followed by a :class:`DINOHead`
(3-layer MLP -> L2-normalised bottleneck -> cosine similarity with unit-norm
prototypes, i.e. weight norm with the gain fixed to 1), wrapped by
:class:`MultiCropNet`, which runs the backbone once per crop resolution.
A ViT backbone is built with timm's ``dynamic_img_size`` (which leaves its
weights unchanged) so that local crops can be smaller than global ones.
The loss is :class:`leukolab.losses.dino_loss.DINOLoss`; the teacher's EMA
update is :func:`leukolab.models.ema.ema_update_`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone, is_vit


@dataclass
class DINOConfig:
    """The ``dino:`` section of a pretrain config (head, loss, teacher schedules and multi-crop views)."""

    out_dim: int = 1024  # prototypes
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    local_crops: int = 4
    local_size: int = 32
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter: float = 1.0  # colour-jitter strength (0 = none)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_ratio: float = 0.3  # share of the steps warming the teacher temperature up
    momentum: float = 0.996  # teacher EMA, cosine-scheduled to 1
    center_momentum: float = 0.9
    koleo_weight: float = 0.0  # DINOv2 uses 0.1
    freeze_last_layer_ratio: float = 0.0  # share of the steps with frozen prototypes
    n_global: int = 2  # global crops (the teacher's views)

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise LeukolabError(f"teacher momentum {self.momentum} is outside [0, 1]; expected e.g. 0.996")


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


class MultiCropNet(nn.Module):
    """Backbone + DINO head, run once per crop resolution (DINO's ``MultiCropWrapper``)."""

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


def dino_backbone(name: str, img_size: int, drop_path: float, kwargs: dict[str, Any]) -> nn.Module:
    """A backbone for multi-crop input: a ViT takes any crop size (``dynamic_img_size``) with the same weights."""
    model = create_backbone(name, img_size, drop_path, **kwargs)
    if is_vit(model) and not getattr(model, "dynamic_img_size", False):
        try:
            model = create_backbone(name, img_size, drop_path, dynamic_img_size=True, **kwargs)
        except LeukolabError:
            pass
    return model
