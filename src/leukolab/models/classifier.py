"""Backbone + head = image classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import BackboneSpec
from leukolab.models import heads as _heads  # noqa: F401 - registers the heads
from leukolab.models.backbones import create_backbone, resolve_backbone_name
from leukolab.models.spec import describe_backbone
from leukolab.registry import HEADS


class Classifier(nn.Module):
    """Pooled backbone features -> class logits; ``spec`` describes the backbone for checkpoints."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_backbone: bool = False,
                 spec: BackboneSpec | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        self.spec = spec
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen features: no dropout / batch-norm updates
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                f = self.backbone(x)
        else:
            f = self.backbone(x)
        return self.head(f)


def build_classifier(model_cfg: dict[str, Any], img_size: int, num_classes: int) -> Classifier:
    """A :class:`Classifier` from the ``model:`` section of a config (random weights).

    The head is built by name from :data:`~leukolab.registry.HEADS`. With a frozen
    backbone and ``probe_norm`` the features are standardised (batch statistics, no
    affine) before the head: MAE's linear-probe recipe, so that a few large feature
    dimensions cannot dominate it.
    """
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    backbone = create_backbone(model_cfg["backbone"], img_size, drop_path=model_cfg.get("drop_path", 0.0), **kwargs)
    head = HEADS.build(model_cfg.get("head", "linear"), in_features=backbone.num_features, num_classes=num_classes)
    freeze = bool(model_cfg.get("freeze_backbone", False))
    if freeze and model_cfg.get("probe_norm", False):
        head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), head)
    spec = describe_backbone(backbone, resolve_backbone_name(model_cfg["backbone"]), img_size, kwargs)
    return Classifier(backbone, head, freeze_backbone=freeze, spec=spec)
