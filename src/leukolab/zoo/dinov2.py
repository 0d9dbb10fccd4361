"""facebookresearch/dinov2 (and timm-named) ViT state dicts onto timm's names.

timm already converts the DINOv2 layout (``_convert_dinov2`` in
``timm.models.vision_transformer``, used by its ``checkpoint_filter_fn``):
``mask_token`` dropped, ``register_tokens`` -> ``reg_token`` with the class
position folded into ``cls_token`` (timm's ``vit_*_reg4_dinov2`` models
have ``no_embed_class=True``), SwiGLU ``mlp.w12``/``mlp.w3`` ->
``mlp.fc1``/``mlp.fc2``. That function is used here as it is. What timm
lacks, and this module adds:

* chunked blocks (``block_chunks > 0`` in DINOv2 training checkpoints,
  ``blocks.<chunk>.<idx>.*``) flattened to ``blocks.<idx>.*``;
* split ``attn.q/k/v`` projections fused into ``attn.qkv``, and deit3-style
  ``gamma_1``/``gamma_2`` renamed to ``ls1``/``ls2`` (:func:`fuse_split_qkv`);
* the source key(s) of every tensor, for the conversion report;
* DINOv2's position interpolation rule per release (:func:`dinov2_interpolation`).

timm's ``checkpoint_filter_fn`` itself is not called: it resamples the
position grid with antialiasing to an exact size (not DINOv2's rule, see
:mod:`leukolab.models.pos_embed`), converts registers only when
``mask_token`` is present, and needs the target model.
"""

from __future__ import annotations

import re

import torch
from timm.models.vision_transformer import _convert_dinov2

from leukolab.errors import LeukolabError
from leukolab.zoo.layouts import CHUNKED_BLOCK, SPLIT_QKV

__all__ = ["Renamed", "dinov2_interpolation", "fuse_split_qkv", "timm_like_to_timm"]

#: timm key -> (tensor, the original source keys it comes from)
Renamed = dict[str, tuple[torch.Tensor, list[str]]]

_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")


def dinov2_interpolation(has_registers: bool) -> tuple[bool, float]:
    """``(antialias, offset)`` of DINOv2's ``interpolate_pos_encoding`` for a released model.

    ``hub/backbones.py`` builds the models with registers with
    ``interpolate_antialias=True, interpolate_offset=0.0``; the others keep the
    ``DinoVisionTransformer`` defaults ``False, 0.1``.
    """
    return (True, 0.0) if has_registers else (False, 0.1)


def timm_like_to_timm(tensors: dict[str, torch.Tensor], origin: dict[str, str]) -> tuple[Renamed, list[str]]:
    """Rename a DINOv2 or timm state dict (wrappers already stripped) onto timm's names.

    Args:
        tensors: ``{normalised key: tensor}``.
        origin: ``{normalised key: key as stored in the file}`` (for the report).

    Returns:
        The renamed tensors with their source keys, and the source keys dropped (``mask_token``).
    """
    flat: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in tensors.items():
        name = key
        if m := CHUNKED_BLOCK.match(key):
            name = f"blocks.{m.group(2)}.{m.group(3)}"
        elif m := _GAMMA.match(key):
            name = f"{m.group(1)}.ls{m.group(2)}.gamma"
        if name in flat:
            raise LeukolabError(f"checkpoint has two tensors for {name} ({source[name]}, {origin[key]})")
        flat[name], source[name] = value, origin[key]

    by_id = {id(v): k for k, v in flat.items()}
    converted = _convert_dinov2(dict(flat), None)  # type: ignore[arg-type]  # the model is not used
    out: Renamed = {}
    used: set[str] = set()
    for key, value in converted.items():
        if id(value) in by_id:  # passed through, perhaps renamed (register_tokens -> reg_token, w12 -> fc1)
            srcs = [source[by_id[id(value)]]]
        else:  # derived: pos_embed without the class position, cls_token with it folded in
            srcs = [source[key]] if key in source else []
            if key == "cls_token" and "pos_embed" in source:
                srcs.append(source["pos_embed"])
        out[key] = (value, srcs)
        used.update(srcs)
    fuse_split_qkv(out)
    dropped = [s for s in source.values() if s not in used]
    return out, dropped


def fuse_split_qkv(renamed: Renamed) -> None:
    """Fuse ``attn.q/k/v`` (or ``q_proj`` ...) into timm's ``attn.qkv`` in place; a missing bias part is zero."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in list(renamed):
        if m := SPLIT_QKV.match(key):
            base, part, kind = m.groups()
            groups.setdefault((base, kind), {})[part[0]] = key
    for (base, kind), parts in groups.items():
        if kind == "weight" and set(parts) != {"q", "k", "v"}:
            names = ", ".join(renamed[k][1][0] for k in parts.values())
            raise LeukolabError(f"checkpoint has only part of a split q/k/v projection ({names})")
        ref = renamed[next(iter(parts.values()))][0]
        pieces = [renamed[parts[p]][0] if p in parts else torch.zeros_like(ref) for p in "qkv"]
        sources = [renamed[parts[p]][1][0] for p in "qkv" if p in parts]
        for key in parts.values():
            del renamed[key]
        renamed[f"{base}.qkv.{kind}"] = (torch.cat(pieces, dim=0), sources)
