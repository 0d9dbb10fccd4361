"""Offline conversion of ViT checkpoints into timm's ``VisionTransformer`` layout.

Nothing here downloads anything: a checkpoint file already on disk is read,
its layout detected, its keys renamed onto the names of a timm
:class:`~timm.models.vision_transformer.VisionTransformer`, and its absolute
position embedding resampled to the grid of the target image size.

Layouts understood (see :func:`detect_format`):

``"dinov2"``
    facebookresearch/dinov2 backbones and checkpoints trained with that code
    base, such as the DinoBloom-S/B/L releases (DINOv2 ViT-S/B/L, patch 14).
    Keys may sit under ``teacher.``, ``student.``, ``backbone.``, ``module.``
    or ``model.``; heads (``dino_head.*``, ``ibot_head.*``) and ``mask_token``
    are dropped; chunked blocks (``blocks.<chunk>.<idx>.*``) are flattened;
    ``register_tokens`` become timm's ``reg_token``.
``"timm"``
    Already timm names (perhaps prefixed), perhaps another position grid.
``"hf-vitmae"``
    HuggingFace ``ViTMAEModel`` / ``ViTMAEForPreTraining`` (and plain
    ``ViTModel``) state dicts; separate query/key/value projections are fused
    into timm's ``qkv``; the MAE decoder is dropped.

Position embeddings are handled in one canonical form: a class-token
position (if the source has one), register positions (if any) and the patch
grid. The patch grid is resampled with :func:`timm.layers.resample_abs_pos_embed`
(bicubic, the prefix positions untouched); the prefix positions are then
either kept inside ``pos_embed`` or folded into ``cls_token`` / ``reg_token``,
depending on the target model's ``no_embed_class``. Both give the same
network function. DINOv2 adds a position to the class token but none to the
registers, so a DINOv2 model with registers is built like timm's own
``vit_*_reg4_dinov2`` models: ``no_embed_class=True`` with the class position
folded into ``cls_token``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.errors import LeukolabError

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
    "vit_from_config",
]

FORMATS: tuple[str, ...] = ("dinov2", "timm", "hf-vitmae")

# Containers that wrap a state dict, most preferred first (the DINO teacher is the
# EMA model used for evaluation, so it wins over the student).
_CONTAINER_KEYS: tuple[str, ...] = (
    "teacher",
    "state_dict",
    "model",
    "model_ema",
    "module",
    "backbone",
    "encoder",
    "student",
)
# Key prefixes stripped from flat state dicts, in the order they are tried.
_PREFIXES: tuple[str, ...] = (
    "module.",
    "teacher.",
    "model.",
    "backbone.",
    "encoder.",
    "student.",
    "_orig_mod.",
)

# Heads for the embedding widths of the standard ViT sizes (Ti/S/B/L/H/g).
_HEADS_BY_DIM: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_SPLIT_QKV = re.compile(r"^(blocks\.\d+\.attn)\.(q|k|v|q_proj|k_proj|v_proj)\.(weight|bias)$")

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

# Internal names of the canonical position pieces (never timm keys themselves).
_CLS_POS = "<cls_pos>"
_REG_POS = "<reg_pos>"
_PATCH_POS = "<patch_pos>"


@dataclass
class ConversionReport:
    """What a conversion did, key by key.

    Attributes:
        mapped: ``(source key, timm key)`` pairs; a source key feeding several
            timm keys (``pos_embed`` folded into ``cls_token``) or several source
            keys feeding one (split q/k/v fused into ``qkv``) give several pairs.
            Source keys are named as they appear in the (unwrapped) checkpoint.
        dropped: source keys with no timm counterpart (``dino_head.*``,
            ``mask_token``, the MAE decoder, classifier heads, student copies).
        missing: keys of the target model the converted state dict lacks.
        resized: human-readable resamplings, e.g. ``"pos_embed: 37x37 -> 16x16"``.
        notes: anything else worth knowing (guessed head count, folded class
            position, layer-norm epsilon differences).
    """

    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a multi-line, human-readable account of the conversion."""
        targets = sorted({t for _, t in self.mapped})
        lines = [f"mapped {len(self.mapped)} source tensors onto {len(targets)} timm keys"]
        lines.append("resized: " + ("; ".join(self.resized) if self.resized else "nothing"))
        lines.append(f"dropped {len(self.dropped)} source keys" + _preview(self.dropped))
        lines.append(f"missing {len(self.missing)} model keys" + _preview(self.missing))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _preview(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f": {shown}{more}"


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------


def load_state_dict_file(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with :mod:`safetensors`; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. Common containers are
    unwrapped: ``{"teacher": ...}`` (preferred over ``"student"``),
    ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_ema": ...}``,
    ``{"backbone": ...}`` and nestings of them; entries that are not tensors
    (epoch counters, optimizer state, configs) are skipped.

    Args:
        path: the checkpoint file.
        allow_pickle: fall back to ``weights_only=False`` when the file holds
            arbitrary Python objects. That executes code from the file; only
            for files you trust.

    Raises:
        LeukolabError: the file does not exist, cannot be read, or holds no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise LeukolabError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise LeukolabError(f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise LeukolabError(f"cannot read checkpoint {path} as safetensors: {exc}") from exc
    else:
        obj = _torch_load(path, allow_pickle)

    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise LeukolabError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict of tensors"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LeukolabError(f"checkpoint {path} holds no tensors; expected a ViT state dict")
    return tensors


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc):  # not a refused class but a broken / foreign file
            raise LeukolabError(f"cannot read checkpoint {path}: not a torch.save file, or corrupt") from exc
        if not allow_pickle:
            raise LeukolabError(
                f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses; "
                "load it with allow_pickle=True only if you trust the file"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LeukolabError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary unpickling failures
        raise LeukolabError(f"cannot read checkpoint {path}: {exc}") from exc


def _unwrap(obj: Any) -> Any:
    """Descend into container dicts until one holds tensors directly."""
    for _ in range(8):
        if not isinstance(obj, Mapping) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        else:
            return obj
    return obj


# --------------------------------------------------------------------------------------
# Key normalisation and layout detection
# --------------------------------------------------------------------------------------


def _looks_like_vit(keys: list[str]) -> bool:
    return any("patch_embed" in k for k in keys)


def _normalize(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """Strip wrapper prefixes.

    Returns ``{normalised key: original key}`` and the original keys left out
    (e.g. ``dino_head.*`` next to ``backbone.*``, or a student next to a teacher).
    """
    current = {str(k): str(k) for k in sd}
    dropped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            inside = [k for k in current if k.startswith(prefix)]
            if not inside:
                continue
            stripped = [k[len(prefix) :] for k in inside]
            if len(inside) < len(current):
                # only part of the dict is under this prefix: keep that part if it is the ViT
                rest = [k for k in current if not k.startswith(prefix)]
                if not _looks_like_vit(stripped) or (prefix != "teacher." and _looks_like_vit(rest)):
                    continue
                dropped.extend(current[k] for k in current if not k.startswith(prefix))
            current = {k[len(prefix) :]: current[k] for k in inside}
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
        or any(_CHUNKED_BLOCK.match(k) for k in keys)
        or any(_SPLIT_QKV.match(k) for k in keys)
        or any(k.endswith((".mlp.w12.weight", ".mlp.w3.weight")) for k in keys)
    ):
        return "dinov2"
    if any(k.startswith("blocks.") for k in keys):
        return "timm"
    return None


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a state dict: ``"dinov2"``, ``"timm"`` or ``"hf-vitmae"``.

    Wrapper prefixes (``teacher.``, ``backbone.``, ``module.``, ...) are looked
    through. A DINOv2 backbone without ``mask_token`` and registers has exactly
    timm's names and is reported as ``"timm"``; both convert the same way.

    Raises:
        LeukolabError: the keys match none of the known layouts.
    """
    keys, _ = _normalize(sd)
    fmt = _detect(set(keys))
    if fmt is None:
        sample = ", ".join(list(sd)[:5]) or "no keys"
        raise LeukolabError(
            f"unknown checkpoint layout (keys: {sample}); expected a DINOv2, timm or HuggingFace ViTMAE ViT"
        )
    return fmt


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise LeukolabError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


# --------------------------------------------------------------------------------------
# Canonical form
# --------------------------------------------------------------------------------------


@dataclass
class _Canon:
    """Source weights under timm block names, positions split into pieces."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    swiglu: bool = False

    def put(self, key: str, value: torch.Tensor, sources: list[str]) -> None:
        if key in self.tensors:
            both = ", ".join(self.sources[key] + sources)
            raise LeukolabError(f"checkpoint has two tensors for {key} ({both})")
        self.tensors[key] = value
        self.sources[key] = sources


def _canonicalize(sd: Mapping[str, torch.Tensor], fmt: str) -> _Canon:
    keys, dropped = _normalize(sd)
    tensors = {k: sd[orig] for k, orig in keys.items()}
    canon = _Canon()
    canon.dropped.extend(dropped)
    if fmt == "hf-vitmae":
        renamed = _rename_hf(tensors, keys, canon)
    else:
        renamed = _rename_timm_like(tensors, keys, canon)
    _fuse_split_qkv(renamed, canon)
    for key, (value, sources) in renamed.items():
        if key == "pos_embed":
            continue
        canon.put(key, value, sources)
    if "pos_embed" in renamed:
        _split_pos_embed(renamed["pos_embed"], canon, fmt)
    return canon


def _rename_timm_like(
    tensors: dict[str, torch.Tensor], origin: dict[str, str], canon: _Canon
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for key, value in tensors.items():
        src = origin[key]
        name = key
        m = _CHUNKED_BLOCK.match(name)
        if m:  # dinov2 block_chunks > 0: blocks.<chunk>.<global idx>.*
            name = f"blocks.{m.group(2)}.{m.group(3)}"
        if name == "mask_token":
            canon.dropped.append(src)
            continue
        if name == "register_tokens":
            name = "reg_token"
        m = _BLOCK.match(name)
        if m:
            idx, rest = m.groups()
            if rest.startswith("mlp.w12."):
                rest = "mlp.fc1." + rest[len("mlp.w12.") :]
                canon.swiglu = True
            elif rest.startswith("mlp.w3."):
                rest = "mlp.fc2." + rest[len("mlp.w3.") :]
            elif rest in ("gamma_1", "gamma_2"):  # old deit3-style layer scale
                rest = f"ls{rest[-1]}.gamma"
            name = f"blocks.{idx}.{rest}"
        if name in out:
            raise LeukolabError(f"checkpoint has two tensors for {name} ({out[name][1][0]}, {src})")
        out[name] = (value, [src])
    return out


def _rename_hf(
    tensors: dict[str, torch.Tensor], origin: dict[str, str], canon: _Canon
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    has_vit_prefix = any(k.startswith("vit.") for k in tensors)
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for key, value in tensors.items():
        src = origin[key]
        if has_vit_prefix:
            if not key.startswith("vit."):
                canon.dropped.append(src)  # decoder.*, classifier.*, ...
                continue
            key = key[len("vit.") :]
        name: str | None = _HF_TOP_NAMES.get(key)
        m = _HF_LAYER.match(key)
        if name is None and m:
            idx, rest = m.groups()
            for hf_name, timm_name in _HF_LAYER_NAMES.items():
                if rest.startswith(hf_name + "."):
                    name = f"blocks.{idx}.{timm_name}.{rest[len(hf_name) + 1 :]}"
                    break
            else:
                qkv = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
                if qkv:
                    name = f"blocks.{idx}.attn.{qkv.group(1)[0]}.{qkv.group(2)}"
        if name is None:
            canon.dropped.append(src)  # pooler, mask_token, position_ids, ...
            continue
        out[name] = (value, [src])
    return out


def _fuse_split_qkv(renamed: dict[str, tuple[torch.Tensor, list[str]]], canon: _Canon) -> None:
    """Fuse ``attn.q/k/v`` (or ``q_proj``...) into timm's ``attn.qkv`` in place."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in list(renamed):
        m = _SPLIT_QKV.match(key)
        if m:
            base, part, kind = m.groups()
            groups.setdefault((base, kind), {})[part[0]] = key
    for (base, kind), parts in groups.items():
        if kind == "weight" and set(parts) != {"q", "k", "v"}:
            names = ", ".join(renamed[k][1][0] for k in parts.values())
            raise LeukolabError(f"checkpoint has only part of a split q/k/v projection ({names})")
        if kind == "bias":
            weights = groups.get((base, "weight"), {})
            ref = renamed[next(iter(parts.values()))][0]
            pieces = []
            for p in "qkv":
                if p in parts:
                    pieces.append(renamed[parts[p]][0])
                elif p in weights:  # e.g. no key bias (BEiT-style): zero
                    pieces.append(torch.zeros_like(ref))
        else:
            pieces = [renamed[parts[p]][0] for p in "qkv"]
        sources = [renamed[parts[p]][1][0] for p in "qkv" if p in parts]
        for p in parts.values():
            del renamed[p]
        renamed[f"{base}.qkv.{kind}"] = (torch.cat(pieces, dim=0), sources)


def _square(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def _split_pos_embed(entry: tuple[torch.Tensor, list[str]], canon: _Canon, fmt: str) -> None:
    pos, sources = entry
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise LeukolabError(f"{sources[0]} has shape {tuple(pos.shape)}, expected (1, tokens, dim)")
    length = pos.shape[1]
    has_cls = "cls_token" in canon.tensors
    regs = canon.tensors["reg_token"].shape[1] if "reg_token" in canon.tensors else 0
    if fmt == "timm":
        # timm: positions for all prefix tokens, or (no_embed_class) for none of them
        candidates = [int(has_cls) + regs, 0]
    else:
        # DINOv2 and HF: the class token has a position, registers never do
        candidates = [int(has_cls), 0]
    for prefix in dict.fromkeys(candidates):
        side = _square(length - prefix)
        if side is not None:
            break
    else:
        raise LeukolabError(
            f"{sources[0]} has {length} positions, which is no square patch grid plus "
            f"{candidates[0]} prefix positions"
        )
    canon.grid = (side, side)
    canon.put(_PATCH_POS, pos[:, prefix:], sources)
    if prefix >= 1 and has_cls:
        canon.put(_CLS_POS, pos[:, :1], sources)
        if prefix > 1:
            canon.put(_REG_POS, pos[:, 1:prefix], sources)
    elif prefix >= 1:
        canon.put(_REG_POS, pos[:, :prefix], sources)


# --------------------------------------------------------------------------------------
# Conversion onto a target model
# --------------------------------------------------------------------------------------


def _grid_of(model: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[return-value]


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
    fmt: str | None,
    model: nn.Module,
    strict: bool = True,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename and reshape a checkpoint's tensors onto ``model.state_dict()`` names.

    The model is not modified; load the result with ``model.load_state_dict``.

    Args:
        sd: the checkpoint's tensors (see :func:`load_state_dict_file`), possibly
            under wrapper prefixes.
        fmt: one of :data:`FORMATS`, or ``None`` to detect it.
        model: the target timm ``VisionTransformer``; its patch grid decides the
            position-embedding size, its ``no_embed_class`` where prefix positions go.
        strict: raise when model keys stay unfilled or shapes cannot be fitted;
            otherwise such keys are left out (listed in ``report.missing``) and
            the offending source keys listed in ``report.dropped``.

    Returns:
        The converted state dict (only keys of ``model``, shapes matching) and a
        :class:`ConversionReport`.

    Raises:
        LeukolabError: unknown layout, or (``strict``) missing keys / unfittable shapes.
    """
    fmt = _check_format(fmt) if fmt is not None else detect_format(sd)
    canon = _canonicalize(sd, fmt)
    report = ConversionReport(dropped=list(canon.dropped))
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, list[str]] = {}

    def emit(key: str, value: torch.Tensor, srcs: list[str]) -> None:
        out[key] = value
        sources[key] = srcs

    t = dict(canon.tensors)
    s = canon.sources
    cls_pos = t.pop(_CLS_POS, None)
    reg_pos = t.pop(_REG_POS, None)
    patch_pos = t.pop(_PATCH_POS, None)
    pos_srcs = s.get(_PATCH_POS, [])
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    has_cls = getattr(model, "cls_token", None) is not None
    n_reg = int(getattr(model, "num_reg_tokens", 0) or 0)

    # class and register tokens, with their positions folded in when the model has none for them
    if "cls_token" in t:
        cls = t.pop("cls_token")
        srcs = list(s["cls_token"])
        if has_cls and no_embed_class and cls_pos is not None:
            cls = cls + cls_pos
            srcs += pos_srcs
            report.notes.append("class-token position folded into cls_token (model has no_embed_class=True)")
        emit("cls_token", cls, srcs)
    if "reg_token" in t:
        reg = t.pop("reg_token")
        srcs = list(s["reg_token"])
        if no_embed_class and reg_pos is not None and reg_pos.shape == reg.shape:
            reg = reg + reg_pos
            srcs += pos_srcs
        emit("reg_token", reg, srcs)

    # position embedding: patch grid resampled, prefix positions kept where the model has them
    if patch_pos is not None and "pos_embed" in target:
        new_grid = _grid_of(model)
        old_grid = canon.grid or new_grid
        if old_grid != new_grid:
            from timm.layers import resample_abs_pos_embed

            patch_pos = resample_abs_pos_embed(
                patch_pos, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0
            )
            report.resized.append(f"pos_embed: {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}")
        pieces = []
        if not no_embed_class:
            dim = patch_pos.shape[-1]
            if has_cls:
                pieces.append(cls_pos if cls_pos is not None else patch_pos.new_zeros(1, 1, dim))
            if n_reg:
                fits = reg_pos is not None and reg_pos.shape[1] == n_reg
                pieces.append(reg_pos if fits else patch_pos.new_zeros(1, n_reg, dim))
        emit("pos_embed", torch.cat([*pieces, patch_pos], dim=1), pos_srcs)
    elif patch_pos is not None:
        report.dropped.extend(k for k in pos_srcs if k not in report.dropped)

    # patch embedding: resample the kernel when the patch size differs
    w = t.pop("patch_embed.proj.weight", None)
    if w is not None:
        want = target.get("patch_embed.proj.weight")
        if (
            want is not None
            and w.ndim == 4
            and w.shape[:2] == want.shape[:2]
            and w.shape[2:] != want.shape[2:]
        ):
            from timm.layers import resample_patch_embed

            report.resized.append(
                f"patch_embed.proj.weight: {w.shape[2]}x{w.shape[3]} -> {want.shape[2]}x{want.shape[3]}"
            )
            w = resample_patch_embed(w, list(want.shape[2:]))
        emit("patch_embed.proj.weight", w, s["patch_embed.proj.weight"])

    for key, value in t.items():
        emit(key, value, s[key])

    # match against the model
    result: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in out.items():
        if key not in target:
            report.dropped.extend(k for k in sources[key] if k not in report.dropped)
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
            report.dropped.extend(k for k in sources[key] if k not in report.dropped)
            continue
        result[key] = value.to(dtype=target[key].dtype)
        report.mapped.extend((src, key) for src in sources[key])
    report.missing = [k for k in target if k not in result]

    if strict and mismatched:
        raise LeukolabError(
            f"{len(mismatched)} checkpoint tensors cannot be fitted to the model: {'; '.join(mismatched[:3])}"
            + (" ..." if len(mismatched) > 3 else "")
        )
    if strict and report.missing:
        first = ", ".join(report.missing[:5]) + (", ..." if len(report.missing) > 5 else "")
        raise LeukolabError(
            f"checkpoint is missing {len(report.missing)} keys the model needs ({first}); "
            "it does not fit this ViT"
        )
    return result, report


# --------------------------------------------------------------------------------------
# Inferring and building the model
# --------------------------------------------------------------------------------------


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio with ``int(dim * ratio) == hidden`` (timm's Block computes it that way)."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        ratio = (hidden + 0.5) / dim
    return ratio


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
    fmt = _check_format(fmt) if fmt is not None else detect_format(sd)
    canon = _canonicalize(sd, fmt)
    t = canon.tensors
    proj = t.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise LeukolabError("checkpoint has no 4-d patch_embed.proj.weight; cannot infer the ViT")
    embed_dim, in_chans, ph, pw = (int(x) for x in proj.shape)
    blocks = {int(m.group(1)) for k in t if (m := _BLOCK.match(k))}
    if not blocks:
        raise LeukolabError("checkpoint has no transformer blocks; cannot infer the ViT depth")
    if canon.grid is None:
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
    if fmt == "timm":
        # positions stored for the prefix tokens or not at all
        no_embed_class = _CLS_POS not in t and _REG_POS not in t and (class_token or reg_tokens > 0)
    else:
        # DINOv2 registers have no position: fold the class position, as timm's reg4 models do
        no_embed_class = reg_tokens > 0
    return {
        "img_size": canon.grid[0] * ph,
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
        "no_embed_class": bool(no_embed_class),
        "pre_norm": "norm_pre.weight" in t,
        "mlp_layer": "swiglu" if canon.swiglu else "mlp",
        "num_classes": 0,
        "global_pool": "token" if class_token else "avg",
        "dynamic_img_size": False,
    }


def vit_from_config(config: Mapping[str, Any], img_size: int | None = None) -> nn.Module:
    """Build a timm ``VisionTransformer`` (random weights, no head) from :func:`infer_vit_config` data.

    Args:
        config: the plain-data config (also stored as ``backbone_config`` by
            :func:`convert_checkpoint`).
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


def _check_img_size(img_size: int, patch_size: int | list[int]) -> None:
    patch = patch_size if isinstance(patch_size, int) else max(patch_size)
    if not isinstance(img_size, int) or img_size <= 0:
        raise LeukolabError(f"img_size {img_size!r} must be a positive integer")
    sides = [patch_size] * 2 if isinstance(patch_size, int) else list(patch_size)
    if img_size < patch or any(img_size % p for p in sides):
        raise LeukolabError(
            f"img_size {img_size} is not a multiple of the checkpoint's patch size {patch_size}"
        )


def _build(
    sd: Mapping[str, torch.Tensor],
    img_size: int,
    fmt: str | None,
    num_heads: int | None,
    strict: bool,
) -> tuple[nn.Module, ConversionReport, dict[str, Any], str]:
    fmt = _check_format(fmt) if fmt is not None else detect_format(sd)
    config = infer_vit_config(sd, fmt, num_heads=num_heads)
    _check_img_size(img_size, config["patch_size"])
    config["img_size"] = img_size
    model = vit_from_config(config)
    converted, report = convert_state_dict(sd, fmt, model, strict=strict)
    if num_heads is None and config["embed_dim"] not in _HEADS_BY_DIM:
        report.notes.append(
            f"num_heads {config['num_heads']} guessed from embed_dim {config['embed_dim']}; "
            "pass num_heads if that is wrong"
        )
    if fmt == "hf-vitmae":
        report.notes.append("HF ViT configs default to LayerNorm eps 1e-12; the timm model uses 1e-6")
    model.load_state_dict(converted, strict=False)
    model.eval()
    return model, report, config, fmt


def build_vit_from_checkpoint(
    path: Path,
    img_size: int,
    fmt: str | None = None,
    *,
    num_heads: int | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Create a timm ``VisionTransformer`` for ``img_size`` and load a checkpoint into it.

    The model has the inferred architecture (:func:`infer_vit_config`), a class
    token, the checkpoint's registers and layer scale, ``dynamic_img_size=False``
    and no head (``num_classes=0``); it is returned in eval mode. With
    ``strict=False`` keys the checkpoint cannot fill keep their random
    initialisation and are listed in ``report.missing``.

    Raises:
        LeukolabError: unreadable file, unknown layout, bad ``img_size``, or
            (``strict``) weights that do not fit.
    """
    path = Path(path)
    sd = load_state_dict_file(path, allow_pickle=allow_pickle)
    try:
        model, report, _, _ = _build(sd, img_size, fmt, num_heads, strict)
    except LeukolabError as exc:
        raise LeukolabError(f"{path}: {exc}") from exc
    return model, report


def convert_checkpoint(
    src: Path,
    out: Path,
    fmt: str | None,
    img_size: int,
    *,
    num_heads: int | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> ConversionReport:
    """Convert a checkpoint file into a leukolab/timm backbone file.

    Writes, with :func:`torch.save`, ``{"backbone": timm state dict,
    "backbone_config": plain-data kwargs for :func:`vit_from_config` (with
    ``img_size``), "source": str(src), "format": detected or given format}``.
    The file loads with ``torch.load(weights_only=True)``; rebuild the model
    with :func:`load_converted_backbone`.

    Raises:
        LeukolabError: ``out`` already exists, or the conversion fails.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise LeukolabError(f"output {out} already exists; refusing to overwrite it")
    sd = load_state_dict_file(src, allow_pickle=allow_pickle)
    try:
        model, report, config, fmt = _build(sd, img_size, fmt, num_heads, strict)
    except LeukolabError as exc:
        raise LeukolabError(f"{src}: {exc}") from exc
    payload = {
        "backbone": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        "backbone_config": config,
        "source": str(src),
        "format": fmt,
        "normalisation": "imagenet",  # DINOv2 / DinoBloom, timm and HF ViTMAE weights are trained on ImageNet stats
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        if out.exists():
            raise LeukolabError(f"output {out} already exists; refusing to overwrite it")
        os.replace(tmp, out)
    except OSError as exc:
        raise LeukolabError(f"cannot write {out}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return report


def load_converted_backbone(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model written by :func:`convert_checkpoint`; returns ``(model, backbone_config)``.

    Raises:
        LeukolabError: the file is unreadable or not a converted backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise LeukolabError(f"converted backbone {path} does not exist")
    obj = _torch_load(path, allow_pickle=False)
    if not isinstance(obj, Mapping) or "backbone" not in obj or "backbone_config" not in obj:
        raise LeukolabError(
            f"{path} is not a converted backbone; expected keys 'backbone' and 'backbone_config'"
        )
    config = dict(obj["backbone_config"])
    model = vit_from_config(config)
    try:
        model.load_state_dict(obj["backbone"], strict=True)
    except RuntimeError as exc:
        raise LeukolabError(f"{path}: backbone weights do not fit its backbone_config: {exc}") from exc
    model.eval()
    return model, config
