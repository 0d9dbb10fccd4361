"""Backbones: any timm model by name (ViT, ResNet, EfficientNet ...), built offline.

``create_backbone`` never downloads weights (``pretrained=False``); weights come
from a local file through :func:`leukolab.models.weights.load_backbone_weights`.
Extra non-timm backbones can be added to :data:`BACKBONES` in a new module.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import timm
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.registry import Registry

#: non-timm backbones (factory(img_size=..., **kwargs) -> nn.Module with ``num_features``)
BACKBONES: Registry[Any] = Registry("backbone")


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    return frozenset(timm.list_models())


def resolve_backbone_name(name: str) -> str:
    """The timm (or registry) name for ``name``; ``vit_tiny_patch16`` -> ``vit_tiny_patch16_224``."""
    if name in BACKBONES:
        return name
    names = _timm_names()
    if name in names:
        return name
    for suffix in ("_224", "_384", "_518"):
        if name + suffix in names:
            return name + suffix
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise LeukolabError(f"unknown backbone {name!r}; expected a timm model name{hint}")


def is_vit(model: nn.Module) -> bool:
    """True for timm Vision Transformers (patch embedding + blocks)."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def create_backbone(name: str, img_size: int, drop_path: float = 0.0, **kwargs: Any) -> nn.Module:
    """A headless backbone (``num_classes=0``) with random weights.

    ViTs are built for ``img_size`` (which must be a multiple of the patch
    size); convolutional nets take any size.
    """
    resolved = resolve_backbone_name(name)
    if resolved in BACKBONES:
        return BACKBONES.build(resolved, img_size=img_size, **kwargs)
    base: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if drop_path:
        base["drop_path_rate"] = drop_path
    try:
        model = timm.create_model(resolved, img_size=img_size, **base, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise LeukolabError(f"backbone {resolved}: bad option(s) {kwargs} ({exc})") from None
        try:
            model = timm.create_model(resolved, **base, **kwargs)
        except TypeError as exc2:
            raise LeukolabError(f"backbone {resolved}: bad option(s) {kwargs} ({exc2})") from None
    except AssertionError as exc:
        raise LeukolabError(f"backbone {resolved} cannot be built at img_size {img_size} ({exc})") from None
    if is_vit(model):
        patch = model.patch_embed.patch_size[0]
        if img_size % patch:
            raise LeukolabError(f"image size {img_size} is not a multiple of {resolved}'s patch size {patch}")
    return model


# the non-timm backbones register themselves in BACKBONES on import (they import this module: keep this last)
from leukolab.models import fusion as _fusion  # noqa: E402, F401
