"""Reading a foreign ViT checkpoint and naming its layout.

A file is read through :func:`leukolab.checkpoints.load_checkpoint` (so
pickled files need ``allow_pickle``), its state dict found inside the usual
containers (:func:`leukolab.checkpoints.tensors_of`), wrapper prefixes
(:data:`leukolab.checkpoints.WRAPPER_PREFIXES`) looked through, and the
layout named:

``"dinov2"``
    facebookresearch/dinov2 backbones and checkpoints trained with that code
    (DINOv2, DinoBloom): ``mask_token``, ``register_tokens``, chunked blocks
    ``blocks.<chunk>.<idx>.*`` or SwiGLU ``mlp.w12``/``mlp.w3``.
``"timm"``
    timm names already (a DINOv2 backbone without ``mask_token`` and
    registers has exactly timm's names and converts the same way).
``"hf-vitmae"``
    HuggingFace ``ViTMAEModel`` / ``ViTMAEForPreTraining`` / ``ViTModel``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from leukolab.checkpoints import WRAPPER_PREFIXES, load_checkpoint, tensors_of
from leukolab.errors import LeukolabError

__all__ = ["FORMATS", "check_format", "detect_format", "load_state_dict_file", "normalize_keys"]

FORMATS: tuple[str, ...] = ("dinov2", "timm", "hf-vitmae")

CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
SPLIT_QKV = re.compile(r"^(blocks\.\d+\.attn)\.(q|k|v|q_proj|k_proj|v_proj)\.(weight|bias)$")


def load_state_dict_file(path: Path | str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Containers are unwrapped (``{"teacher": ...}`` preferred over ``"student"``,
    ``{"state_dict": ...}``, ``{"model": ...}``, ``{"backbone": ...}`` ...);
    wrapper prefixes stay (see :func:`normalize_keys`).

    Args:
        path: the checkpoint file (``.pt``/``.pth`` or ``.safetensors``).
        allow_pickle: read files that hold pickled Python objects (runs code from the file).

    Raises:
        LeukolabError: missing, unreadable or pickled (without ``allow_pickle``) file, or no tensors in it.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise LeukolabError(f"checkpoint {path} is not a file")
    tensors = tensors_of(load_checkpoint(path, allow_pickle=allow_pickle))
    if not tensors:
        raise LeukolabError(f"checkpoint {path} holds no tensors; expected a ViT state dict")
    return tensors


def _looks_like_vit(keys: list[str]) -> bool:
    return any("patch_embed" in k for k in keys)


def normalize_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """Strip wrapper prefixes, keeping the part of the dict that is the ViT.

    Returns ``{normalised key: original key}`` and the original keys left out
    (``dino_head.*`` next to ``backbone.*``, or a student next to a teacher).
    """
    current = {str(k): str(k) for k in sd}
    dropped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            inside = [k for k in current if k.startswith(prefix)]
            if not inside:
                continue
            if len(inside) < len(current):
                # only part of the dict is under this prefix: keep that part if it is the ViT
                rest = [k for k in current if not k.startswith(prefix)]
                stripped = [k[len(prefix):] for k in inside]
                if not _looks_like_vit(stripped) or (prefix != "teacher." and _looks_like_vit(rest)):
                    continue
                dropped.extend(current[k] for k in rest)
            current = {k[len(prefix):]: current[k] for k in inside}
            changed = True
            break
    return current, dropped


def _detect(keys: set[str]) -> str | None:
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys) or any(
        ".attention.attention.query." in k for k in keys
    ):
        return "hf-vitmae"
    if "patch_embed.proj.weight" not in keys:
        return None
    if (
        "mask_token" in keys
        or "register_tokens" in keys
        or any(CHUNKED_BLOCK.match(k) for k in keys)
        or any(k.endswith((".mlp.w12.weight", ".mlp.w3.weight")) for k in keys)
    ):
        return "dinov2"
    if any(k.startswith("blocks.") for k in keys):
        return "timm"
    return None


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a state dict: ``"dinov2"``, ``"timm"`` or ``"hf-vitmae"``.

    Wrapper prefixes (``teacher.``, ``backbone.``, ``module.`` ...) are looked through.

    Raises:
        LeukolabError: the keys match none of the known layouts.
    """
    keys, _ = normalize_keys(sd)
    fmt = _detect(set(keys))
    if fmt is None:
        sample = ", ".join(list(sd)[:5]) or "no keys"
        raise LeukolabError(
            f"unknown checkpoint layout (keys: {sample}); expected a DINOv2, timm or HuggingFace ViTMAE ViT"
        )
    return fmt


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of :data:`FORMATS`, else a one-line error."""
    if fmt not in FORMATS:
        raise LeukolabError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt
