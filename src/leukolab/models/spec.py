"""The :class:`~leukolab.checkpoints.BackboneSpec` of a backbone a leukolab objective trains."""

from __future__ import annotations

from typing import Any

from torch import nn

from leukolab.checkpoints import LEUKOLAB_MEAN, LEUKOLAB_STD, BackboneSpec


def describe_backbone(
    backbone: nn.Module, name: str, img_size: int | None, kwargs: dict[str, Any] | None = None
) -> BackboneSpec:
    """The spec of a timm ``backbone`` built as ``create_backbone(name, img_size, **kwargs)``.

    Every leukolab-trained backbone sees images normalised with leukolab's statistics
    (:mod:`leukolab.data.transforms`); the patch size is read from a ViT's patch embedding.
    """
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    return BackboneSpec(name=name, kwargs=dict(kwargs or {}), img_size=int(img_size) if img_size else None,
                        patch_size=int(patch[0]) if patch is not None else None,
                        mean=LEUKOLAB_MEAN, std=LEUKOLAB_STD)
