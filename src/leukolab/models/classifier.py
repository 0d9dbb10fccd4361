"""Backbone + head = image classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import BackboneSpec
from leukolab.errors import LeukolabError
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
        self.adapter: nn.Module | None = None  # set by attach_adapter
        self.adapter_init: str | None = None
        self.backbone_sha256: str | None = None
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def attach_adapter(self, name: str, options: dict[str, Any], init: str | None = None) -> None:
        """Freeze the backbone and hook the adapter ``name`` into it (:mod:`leukolab.models.adapters`).

        The adapter and the head train. Checkpoints then reference the frozen weights by their
        ``init`` file and SHA-256 instead of storing them (without ``init``, a random backbone,
        they store them).
        """
        from leukolab.models.adapters import apply_adapter
        from leukolab.models.adapters.state import reference_backbone, weights_fingerprint

        if self.freeze_backbone:
            raise LeukolabError(f"adapter {name!r} trains through the frozen backbone; expected freeze_backbone "
                                "false (--adapter already freezes it; drop --freeze-backbone)")
        self.adapter = apply_adapter(self.backbone, name, **options)
        self.adapter_init = init
        self.backbone_sha256 = weights_fingerprint(self.backbone.state_dict())
        if init:
            reference_backbone(self, "backbone")

    def adapter_entries(self) -> dict[str, Any]:
        """``{"adapter": ...}`` for a checkpoint (:func:`leukolab.models.adapters.state.adapter_record`); ``{}``
        without an adapter."""
        if self.adapter is None:
            return {}
        from leukolab.models.adapters.state import adapter_record

        return {"adapter": adapter_record(self.adapter, self.backbone, self.adapter_init, self.backbone_sha256)}

    def parameter_counts(self) -> dict[str, Any]:
        """History columns: ``trainable_params``, ``trainable_share`` and ``adapter`` (its config, or ``none``)."""
        from leukolab.models.adapters import parameter_columns

        return parameter_columns(self, self.adapter)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone or self.adapter is not None:
            self.backbone.eval()  # frozen features: no dropout / batch-norm updates (an adapter keeps its own mode)
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
    backbone (``freeze_backbone``, or an ``adapter`` name: the pipeline attaches the
    adapter after loading ``init``) and ``probe_norm`` the features are standardised (batch statistics, no
    affine) before the head: MAE's linear-probe recipe, so that a few large feature
    dimensions cannot dominate it.
    """
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    backbone = create_backbone(model_cfg["backbone"], img_size, drop_path=model_cfg.get("drop_path", 0.0), **kwargs)
    head = HEADS.build(model_cfg.get("head", "linear"), in_features=backbone.num_features, num_classes=num_classes)
    freeze = bool(model_cfg.get("freeze_backbone", False))
    if (freeze or model_cfg.get("adapter")) and model_cfg.get("probe_norm", False):  # any frozen backbone
        head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), head)
    spec = describe_backbone(backbone, resolve_backbone_name(model_cfg["backbone"]), img_size, kwargs)
    return Classifier(backbone, head, freeze_backbone=freeze, spec=spec)
