"""HuggingFace ``ViTModel`` / ``ViTMAEModel`` / ``ViTMAEForPreTraining`` state dicts onto timm's names.

timm has no converter for HuggingFace's ViT naming, so this one is ours:
``embeddings.*`` and ``encoder.layer.<i>.*`` are renamed, separate
query/key/value projections fused into timm's ``qkv``, and everything outside
the encoder (the MAE decoder, classifier, pooler) dropped. HF ViT configs
default to LayerNorm eps 1e-12 where timm uses 1e-6 (noted in the report).
"""

from __future__ import annotations

import re

import torch

from leukolab.zoo.dinov2 import Renamed, fuse_split_qkv

__all__ = ["hf_to_timm"]

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")

_HF_LAYER_NAMES: dict[str, str] = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_NAMES: dict[str, str] = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _timm_name(key: str) -> str | None:
    if key in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[key]
    m = _HF_LAYER.match(key)
    if not m:
        return None
    idx, rest = m.groups()
    for hf_name, timm_name in _HF_LAYER_NAMES.items():
        if rest.startswith(hf_name + "."):
            return f"blocks.{idx}.{timm_name}.{rest[len(hf_name) + 1:]}"
    if qkv := _HF_QKV.match(rest):
        return f"blocks.{idx}.attn.{qkv.group(1)[0]}.{qkv.group(2)}"
    return None


def hf_to_timm(tensors: dict[str, torch.Tensor], origin: dict[str, str]) -> tuple[Renamed, list[str]]:
    """Rename an HF ViT state dict (wrappers already stripped) onto timm's names.

    Returns the renamed tensors with their source keys, and the source keys dropped.
    """
    has_vit_prefix = any(k.startswith("vit.") for k in tensors)
    out: Renamed = {}
    dropped: list[str] = []
    for key, value in tensors.items():
        if has_vit_prefix and not key.startswith("vit."):
            dropped.append(origin[key])  # decoder.*, classifier.*
            continue
        name = _timm_name(key.removeprefix("vit.") if has_vit_prefix else key)
        if name is None:
            dropped.append(origin[key])  # pooler, mask_token, position_ids ...
            continue
        out[name] = (value, [origin[key]])
    fuse_split_qkv(out)
    return out, dropped
