"""Known released ViT weights: architecture, input size, preprocessing and position interpolation.

In the shape of facebookresearch/dinov2's ``hub/backbones.py``: one small
function per family over one maker, the architecture taken from the name
rather than guessed from tensors. Each release names the timm model with
the same architecture (timm's ``vit_*_dinov2`` definitions), so a converted
file is rebuilt with ``timm.create_model(release.timm_name, img_size=...)``.

* DINOv2 (facebookresearch/dinov2, LVD-142M): ViT-S/B/L/g with patch 14,
  trained at 518 px (37x37 grid); with or without 4 registers. Evaluation
  preprocessing ``make_classification_eval_transform``: resize 256 bicubic,
  centre crop 224, ImageNet mean/std. Position interpolation: no antialias
  with offset 0.1, except the register models (antialias, offset 0).
* DinoBloom (marrlab/DinoBloom, zenodo 10908163): DINOv2 ViT-S/B/L/g without
  registers fine-tuned on blood and bone-marrow cells at 224 px (16x16 grid,
  ``pos_embed`` of 257 positions), loaded by its authors into the DINOv2
  hub models (hence DINOv2's interpolation). Their preprocessing is
  ``Resize(224)`` (bilinear) and ImageNet mean/std, no crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leukolab.checkpoints import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from leukolab.errors import LeukolabError

__all__ = ["RELEASES", "Release", "get_release", "match_release"]

#: the input size released weights are used at unless told otherwise
DEFAULT_USE_SIZE = 224


@dataclass(frozen=True)
class Release:
    """One released backbone.

    Attributes:
        name: short name (``dinov2_vits14_reg``, ``dinobloom_b``).
        timm_name: the timm model with this architecture.
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads.
        patch_size: patch side in pixels.
        img_size: the size of the released position grid (grid side x patch).
        reg_tokens: register tokens.
        ffn: ``mlp`` or ``swiglu``.
        mean: input mean the weights expect.
        std: input standard deviation the weights expect.
        crop_pct: evaluation centre crop (timm's ``crop_pct``; 1.0: no crop).
        interpolation: evaluation resize interpolation.
        interpolate_antialias: position-grid resampling: antialias.
        interpolate_offset: position-grid resampling: DINOv2's ``interpolate_offset``.
        source: where the weights are published.
    """

    name: str
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518
    reg_tokens: int = 0
    ffn: str = "mlp"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    source: str = ""

    def spec(self, img_size: int | None = None) -> BackboneSpec:
        """The :class:`BackboneSpec` of this release used at ``img_size`` (default 224)."""
        return BackboneSpec(
            name=self.timm_name, kwargs={}, img_size=int(img_size or DEFAULT_USE_SIZE), patch_size=self.patch_size,
            mean=self.mean, std=self.std, crop_pct=self.crop_pct, interpolation=self.interpolation,
            interpolate_antialias=self.interpolate_antialias, interpolate_offset=self.interpolate_offset,
        )


#: size letter -> (timm size word, embed_dim, depth, num_heads, ffn), as in dinov2's vit_small ... vit_giant2
_SIZES: dict[str, tuple[str, int, int, int, str]] = {
    "s": ("small", 384, 12, 6, "mlp"),
    "b": ("base", 768, 12, 12, "mlp"),
    "l": ("large", 1024, 24, 16, "mlp"),
    "g": ("giant", 1536, 40, 24, "swiglu"),
}


def _make_release(name: str, size: str, *, registers: bool = False, **kwargs: Any) -> Release:
    word, dim, depth, heads, ffn = _SIZES[size]
    timm_name = f"vit_{word}_patch14_{'reg4_' if registers else ''}dinov2"
    interp = {"interpolate_antialias": True, "interpolate_offset": 0.0} if registers else {}
    return Release(name, timm_name, dim, depth, heads, reg_tokens=4 if registers else 0, ffn=ffn,
                   **{**interp, **kwargs})


def _dinov2(size: str, registers: bool = False) -> Release:
    name = f"dinov2_vit{size}14{'_reg' if registers else ''}"
    return _make_release(name, size, registers=registers, source="facebookresearch/dinov2 (LVD-142M)")


def _dinobloom(size: str) -> Release:
    return _make_release(f"dinobloom_{size}", size, img_size=224, crop_pct=1.0, interpolation="bilinear",
                         source="marrlab/DinoBloom (zenodo 10908163)")


#: every known release by name
RELEASES: dict[str, Release] = {
    r.name: r
    for r in [
        *(_dinov2(s) for s in _SIZES),
        *(_dinov2(s, registers=True) for s in _SIZES),
        *(_dinobloom(s) for s in _SIZES),
    ]
}


def get_release(name: str) -> Release:
    """The release called ``name``, or a one-line error listing the known ones."""
    if name not in RELEASES:
        raise LeukolabError(f"unknown release {name!r}; expected one of {', '.join(RELEASES)}")
    return RELEASES[name]


def match_release(config: dict[str, Any]) -> Release | None:
    """The release whose architecture and position grid equal an inferred ViT config, if any.

    ``config`` is :func:`leukolab.zoo.convert.infer_vit_config` output. A
    DINOv2-S at 518 px and DinoBloom-S (224 px) differ only in their grid.
    """
    for release in RELEASES.values():
        if (
            config.get("embed_dim") == release.embed_dim
            and config.get("depth") == release.depth
            and config.get("patch_size") == release.patch_size
            and config.get("img_size") == release.img_size
            and config.get("reg_tokens", 0) == release.reg_tokens
            and config.get("mlp_layer", "mlp") == release.ffn
            and config.get("init_values") is not None
            and config.get("class_token", True)
        ):
            return release
    return None
