"""Backbone + head = image classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leukolab.models import heads as _heads  # noqa: F401 - registers the heads
from leukolab.models.backbones import create_backbone
from leukolab.registry import HEADS


class Classifier(nn.Module):
    """Pooled backbone features -> class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen features: no dropout / batch-norm updates
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of a batch of images."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                f = self.backbone(x)
        else:
            f = self.backbone(x)
        return self.head(f)


def build_classifier(model_cfg: dict[str, Any], img_size: int, num_classes: int) -> Classifier:
    """A :class:`Classifier` from the ``model:`` section of a config (random weights)."""
    backbone = create_backbone(
        model_cfg["backbone"], img_size, drop_path=model_cfg.get("drop_path", 0.0),
        **(model_cfg.get("backbone_kwargs") or {}),
    )
    head = HEADS.build(model_cfg.get("head", "linear"), in_features=backbone.num_features, num_classes=num_classes)
    freeze = bool(model_cfg.get("freeze_backbone", False))
    if freeze and model_cfg.get("probe_norm", False):
        # MAE's linear-probe recipe: frozen features are standardised (batch statistics, no affine)
        # before the head, so a few large feature dimensions cannot dominate it
        head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), head)
    return Classifier(backbone, head, freeze_backbone=freeze)
