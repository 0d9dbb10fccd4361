"""Offline conversion of ViT checkpoints into timm's ``VisionTransformer`` (the ``convert`` entry point).

Nothing here downloads anything. A checkpoint file already on disk is read
(:mod:`leukolab.zoo.layouts`), renamed onto timm's names
(:mod:`leukolab.zoo.dinov2`, :mod:`leukolab.zoo.hf`), its architecture
inferred (:func:`infer_vit_config`) and, when it is a known release
(:mod:`leukolab.zoo.releases`), described by that release's table entry.

:func:`convert_checkpoint` writes the weights at the checkpoint's own
position grid (a DINOv2 release keeps its 37x37 grid) with a
:class:`~leukolab.checkpoints.BackboneSpec` naming the timm model, the image
size to use by default, ImageNet normalisation, the release's evaluation
preprocessing and its position interpolation rule. Whoever builds the model
for some image size resamples the grid once, from the original, the way
DINOv2 does at run time, so the converted model gives DINOv2's own features
at any multiple of the patch size
(:func:`leukolab.models.weights.load_backbone_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import (
    CHECKPOINT_FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    load_checkpoint,
    save_checkpoint,
    tensors_of,
)
from leukolab.errors import LeukolabError
from leukolab.zoo.dinov2 import dinov2_interpolation
from leukolab.zoo.fit import ConversionReport, SourceViT, fit_to_model, read_source
from leukolab.zoo.layouts import FORMATS, check_format, detect_format, load_state_dict_file
from leukolab.zoo.releases import Release, get_release, match_release

__all__ = [
    "FORMATS",
    "ConversionReport",
    "build_vit_from_checkpoint",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_format",
    "infer_vit_config",
    "load_converted_backbone",
    "load_state_dict_file",
    "spec_from_vit_config",
    "vit_from_config",
]

# Heads for the embedding widths of the standard ViT sizes (Ti/S/B/L/H/g).
_HEADS_BY_DIM: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
# config entries that are not timm.create_model architecture kwargs
_NOT_KWARGS = ("img_size", "num_classes", "mlp_layer", "dynamic_img_size")


def _interpolation(fmt: str, src: SourceViT) -> tuple[bool, float]:
    """The position rule of a layout: DINOv2's for DINOv2 checkpoints, timm's otherwise."""
    return dinov2_interpolation("reg_token" in src.tensors) if fmt == "dinov2" else (True, 0.0)


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
    fmt: str | None,
    model: nn.Module,
    strict: bool = True,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename and reshape a checkpoint's tensors onto ``model.state_dict()`` names.

    The position grid is resampled to the model's from the checkpoint's own
    grid, with DINOv2's rule for DINOv2 checkpoints (see
    :mod:`leukolab.models.pos_embed`) and timm's otherwise. The model is not
    modified; load the result with ``model.load_state_dict``.

    Args:
        sd: the checkpoint's tensors (see :func:`load_state_dict_file`), possibly
            under wrapper prefixes.
        fmt: one of :data:`FORMATS`, or ``None`` to detect it.
        model: the target timm ``VisionTransformer``.
        strict: raise when model keys stay unfilled or shapes cannot be fitted;
            otherwise such keys are left out (``report.missing``).

    Raises:
        LeukolabError: unknown layout, or (``strict``) missing keys / unfittable shapes.
    """
    fmt = check_format(fmt) if fmt is not None else detect_format(sd)
    src = read_source(sd, fmt)
    antialias, offset = _interpolation(fmt, src)
    return fit_to_model(src, model, strict=strict, antialias=antialias, offset=offset)


# --------------------------------------------------------------------------------------
# Inferring and building the model
# --------------------------------------------------------------------------------------


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio with ``int(dim * ratio) == hidden`` (timm's Block computes it that way)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _config_of(src: SourceViT, fmt: str, num_heads: int | None) -> dict[str, Any]:
    t = src.tensors
    proj = t.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise LeukolabError("checkpoint has no 4-d patch_embed.proj.weight; cannot infer the ViT")
    embed_dim, in_chans, ph, pw = (int(x) for x in proj.shape)
    blocks = {int(k.split(".")[1]) for k in t if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks:
        raise LeukolabError("checkpoint has no transformer blocks; cannot infer the ViT depth")
    if src.grid is None:
        raise LeukolabError("checkpoint has no position embedding; cannot infer the ViT")
    fc1 = t.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise LeukolabError("checkpoint lacks blocks.0.mlp.fc1 (or mlp.w12); cannot infer the MLP width")
    if num_heads is None:
        num_heads = _HEADS_BY_DIM.get(embed_dim) or max(1, embed_dim // 64)
    if embed_dim % num_heads:
        raise LeukolabError(f"num_heads {num_heads} does not divide the embedding width {embed_dim}")
    reg_tokens = int(t["reg_token"].shape[1]) if "reg_token" in t else 0
    class_token = "cls_token" in t
    return {
        "img_size": src.grid[0] * ph,
        "patch_size": ph if ph == pw else [ph, pw],
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": max(blocks) + 1,
        "num_heads": int(num_heads),
        "mlp_ratio": _mlp_ratio(int(fc1.shape[0]), embed_dim),
        "qkv_bias": "blocks.0.attn.qkv.bias" in t,
        "qk_norm": "blocks.0.attn.q_norm.weight" in t,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in t else None,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        # positions stored for the prefix tokens, or (DINOv2 registers, timm's reg4 models) for none of them
        "no_embed_class": src.cls_pos is None and src.reg_pos is None and (class_token or reg_tokens > 0),
        "pre_norm": "norm_pre.weight" in t,
        "mlp_layer": "swiglu" if src.swiglu else "mlp",
        "num_classes": 0,
        "global_pool": "token" if class_token else "avg",
        "dynamic_img_size": False,
    }


def infer_vit_config(
    sd: Mapping[str, torch.Tensor], fmt: str | None, *, num_heads: int | None = None
) -> dict[str, Any]:
    """Infer the ViT architecture of a checkpoint as plain, serialisable data.

    The returned dict holds ``img_size`` (the checkpoint's native size: its
    position grid times the patch size), ``patch_size``, ``in_chans``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``,
    ``qk_norm``, ``init_values`` (``1e-5`` when layer scale is present, else
    ``None``), ``class_token``, ``reg_tokens``, ``no_embed_class``,
    ``pre_norm``, ``mlp_layer`` (``"mlp"`` or ``"swiglu"``), plus
    ``num_classes=0``, ``global_pool``, ``dynamic_img_size=False``. Build the
    model with :func:`vit_from_config`.

    The head count is not stored in any weight: it comes from the embedding width
    of the standard sizes (192->3, 384->6, 768->12, 1024->16, 1280->16,
    1536->24), else ``embed_dim // 64``; pass ``num_heads`` to override.

    Raises:
        LeukolabError: unknown layout, or no patch embedding / blocks / position embedding.
    """
    fmt = check_format(fmt) if fmt is not None else detect_format(sd)
    return _config_of(read_source(sd, fmt), fmt, num_heads)


def vit_from_config(config: Mapping[str, Any], img_size: int | None = None) -> nn.Module:
    """Build a timm ``VisionTransformer`` (random weights, no head) from :func:`infer_vit_config` data.

    Args:
        config: the plain-data config.
        img_size: overrides ``config["img_size"]``.
    """
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(config)
    mlp = kwargs.pop("mlp_layer", "mlp")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if isinstance(kwargs.get("patch_size"), list):
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("dynamic_img_size", False)
    if mlp == "swiglu":
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    elif mlp != "mlp":
        raise LeukolabError(f"unknown mlp_layer {mlp!r} in ViT config; expected 'mlp' or 'swiglu'")
    try:
        return VisionTransformer(**kwargs)
    except TypeError as exc:
        raise LeukolabError(f"ViT config does not fit timm's VisionTransformer: {exc}") from exc


def spec_from_vit_config(
    config: Mapping[str, Any], fmt: str | None = None, img_size: int | None = None, release: Release | None = None
) -> BackboneSpec:
    """The :class:`BackboneSpec` of a converted checkpoint.

    A known ``release`` gives its table entry (timm name, preprocessing,
    interpolation). Otherwise the timm model is a generic ViT
    (``vit_base_patch16_224``, or ``vit_giant_patch14_dinov2`` for SwiGLU MLPs)
    with the inferred architecture as keyword arguments, ImageNet
    normalisation and ImageNet evaluation preprocessing (resize 256 bicubic,
    crop 224), and DINOv2's interpolation rule for DINOv2 layouts.
    """
    if release is not None:
        return release.spec(img_size)
    patch = config.get("patch_size", 16)
    swiglu = config.get("mlp_layer") == "swiglu"
    name = "vit_giant_patch14_dinov2" if swiglu else "vit_base_patch16_224"
    kwargs = {k: v for k, v in config.items() if k not in _NOT_KWARGS}
    if isinstance(kwargs.get("patch_size"), list):
        kwargs["patch_size"] = list(kwargs["patch_size"])
    antialias, offset = dinov2_interpolation(bool(config.get("reg_tokens"))) if fmt == "dinov2" else (True, 0.0)
    return BackboneSpec(
        name=name, kwargs=kwargs, img_size=int(img_size or config.get("img_size") or 224),
        patch_size=int(patch if isinstance(patch, int) else patch[0]), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        crop_pct=0.875, interpolation="bicubic", interpolate_antialias=antialias, interpolate_offset=offset,
    )


def _check_img_size(img_size: int, patch_size: int | list[int]) -> None:
    sides = [patch_size] * 2 if isinstance(patch_size, int) else list(patch_size)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise LeukolabError(f"img_size {img_size!r} must be a positive integer")
    if img_size < max(sides) or any(img_size % p for p in sides):
        raise LeukolabError(f"img_size {img_size} is not a multiple of the checkpoint's patch size {patch_size}")


def _convert(
    sd: Mapping[str, torch.Tensor], img_size: int | None, fmt: str | None, num_heads: int | None, strict: bool
) -> tuple[nn.Module, dict[str, torch.Tensor], ConversionReport, dict[str, Any], str]:
    """The inferred ViT at ``img_size`` (None: its own grid), built on the meta device (no memory),
    and the checkpoint's tensors fitted onto it."""
    fmt = check_format(fmt) if fmt is not None else detect_format(sd)
    src = read_source(sd, fmt)
    config = _config_of(src, fmt, num_heads)
    if img_size is not None:
        _check_img_size(img_size, config["patch_size"])
    with torch.device("meta"):
        model = vit_from_config(config, img_size=img_size)
    antialias, offset = _interpolation(fmt, src)
    converted, report = fit_to_model(src, model, strict=strict, antialias=antialias, offset=offset)
    if num_heads is None and config["embed_dim"] not in _HEADS_BY_DIM:
        report.notes.append(
            f"num_heads {config['num_heads']} guessed from embed_dim {config['embed_dim']}; "
            "pass num_heads if that is wrong"
        )
    if fmt == "hf-vitmae":
        report.notes.append("HF ViT configs default to LayerNorm eps 1e-12; the timm model uses 1e-6")
    return model, converted, report, config, fmt


def _build(
    sd: Mapping[str, torch.Tensor], img_size: int | None, fmt: str | None, num_heads: int | None, strict: bool
) -> tuple[nn.Module, ConversionReport, dict[str, Any], str]:
    """:func:`_convert`, then the model made real with the checkpoint loaded (random where ``report.missing``)."""
    _, converted, report, config, fmt = _convert(sd, img_size, fmt, num_heads, strict)
    model = vit_from_config(config, img_size=img_size)
    model.load_state_dict(converted, strict=False)
    return model.eval(), report, config, fmt


def build_vit_from_checkpoint(
    path: Path | str,
    img_size: int,
    fmt: str | None = None,
    *,
    num_heads: int | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Create a timm ``VisionTransformer`` for ``img_size`` and load a foreign checkpoint into it.

    The model has the inferred architecture (:func:`infer_vit_config`), the
    checkpoint's registers and layer scale, ``dynamic_img_size=False`` and no
    head; its position grid is resampled once from the checkpoint's own (DINOv2's
    rule for DINOv2 checkpoints). It is returned in eval mode. With
    ``strict=False`` keys the checkpoint cannot fill keep their random
    initialisation and are listed in ``report.missing``.

    Raises:
        LeukolabError: unreadable or pickled file (without ``allow_pickle``),
            unknown layout, bad ``img_size``, or (``strict``) weights that do not fit.
    """
    path = Path(path)
    sd = load_state_dict_file(path, allow_pickle=allow_pickle)
    try:
        model, report, _, _ = _build(sd, img_size, fmt, num_heads, strict)
    except LeukolabError as exc:
        raise LeukolabError(f"{path}: {exc}") from None
    return model, report


def convert_checkpoint(
    src: Path | str,
    out: Path | str,
    fmt: str | None,
    img_size: int,
    *,
    num_heads: int | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    release: str | None = None,
) -> ConversionReport:
    """Convert a checkpoint file into a leukolab backbone file (never overwriting one).

    The file holds ``backbone`` (the timm state dict at the checkpoint's own
    position grid), ``backbone_spec`` (:class:`BackboneSpec`: timm name,
    ``img_size`` to use by default, ImageNet mean/std, the release's
    evaluation preprocessing and position interpolation), ``task``
    (``"converted"``), ``release`` (matched or given table name, or None),
    ``source`` and ``source_format``. It loads with ``weights_only=True``; rebuild it
    with :func:`load_converted_backbone` or
    :func:`leukolab.models.weights.load_backbone_weights`.

    Args:
        src: the foreign checkpoint.
        out: the new file.
        fmt: its layout, or None to detect it.
        img_size: the input size the backbone is used at by default.
        num_heads: head count (only for non-standard widths).
        strict: refuse checkpoints that do not fill the model.
        allow_pickle: read a file holding pickled Python objects (runs code from it).
        release: a :data:`~leukolab.zoo.releases.RELEASES` name; default: matched by architecture.

    Raises:
        LeukolabError: ``out`` exists, unreadable/pickled source, or the conversion fails.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise LeukolabError(f"output {out} already exists; refusing to overwrite it")
    chosen = get_release(release) if release is not None else None
    sd = load_state_dict_file(src, allow_pickle=allow_pickle)
    try:
        _, converted, report, config, fmt = _convert(sd, None, fmt, num_heads, strict)
        _check_img_size(img_size, config["patch_size"])
        if report.missing:  # --no-strict: the keys the checkpoint lacks keep a random initialisation
            converted = _build(sd, None, fmt, num_heads, strict)[0].state_dict()
    except LeukolabError as exc:
        raise LeukolabError(f"{src}: {exc}") from None
    matched = match_release(config)
    if chosen is not None and matched is not chosen:
        raise LeukolabError(
            f"{src}: --release {chosen.name} expects a {chosen.timm_name} with a {chosen.img_size}-px grid; "
            "the checkpoint's architecture differs"
        )
    chosen = chosen or matched
    report.notes.append(f"release: {chosen.name} ({chosen.source})" if chosen else "release: not a known release")
    spec = spec_from_vit_config(config, fmt, img_size, chosen)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "task": "converted",
        "backbone": {k: v.detach().contiguous() for k, v in converted.items()},
        "backbone_spec": spec.to_dict(),
        "release": chosen.name if chosen else None,
        "source": str(src),
        "source_format": fmt,
    }
    save_checkpoint(payload, out, overwrite=False)  # atomic; refuses an existing file with a one-line error
    return report


def load_converted_backbone(
    path: Path | str, img_size: int | None = None, *, allow_pickle: bool = False
) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild a backbone written by :func:`convert_checkpoint`; returns ``(model, spec)`` in eval mode.

    ``img_size`` defaults to the spec's; the position grid is resampled once
    from the stored one with the spec's rule. Files written by older versions
    (``backbone_config`` instead of ``backbone_spec``) are read too.

    Raises:
        LeukolabError: the file is unreadable or not a converted backbone.
    """
    from leukolab.models.backbones import create_backbone
    from leukolab.models.weights import backbone_spec_of, load_backbone_state

    path = Path(path)
    obj = load_checkpoint(path, allow_pickle=allow_pickle)
    spec = backbone_spec_of(obj) if isinstance(obj, Mapping) else None
    if spec is None or not tensors_of(obj):
        raise LeukolabError(f"{path} is not a converted backbone; expected 'backbone' and 'backbone_spec' entries")
    size = int(img_size or spec.img_size or 224)
    if "backbone_spec" not in obj and isinstance(obj.get("backbone_config"), Mapping):
        model = vit_from_config(obj["backbone_config"], img_size=size)  # written before backbone_spec existed
    else:
        model = create_backbone(spec.name, size, **spec.kwargs)
    load_backbone_state(model, obj, path)
    return model.eval(), spec
