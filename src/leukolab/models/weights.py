"""Load backbone weights from a local file into a timm backbone.

Accepted: a leukolab run folder or checkpoint (its ``backbone`` entry, in
timm naming, described by its ``backbone_spec``), a backbone written by
``leukolab convert``, a plain timm state dict, or a released DINOv2 /
DinoBloom / HF-ViTMAE ViT file (mapped by :mod:`leukolab.zoo`). Every file
is read by :func:`leukolab.checkpoints.load_checkpoint`: pickled files only
with ``allow_pickle``. Shapes that do not fit and required keys that are
missing are refused with a one-line error.

A position grid of another size is resampled from the stored grid with the
rule the checkpoint's :class:`~leukolab.checkpoints.BackboneSpec` records
(DINOv2's for converted DINOv2 releases; see :mod:`leukolab.models.pos_embed`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import (
    BackboneSpec,
    load_checkpoint,
    resolve_checkpoint_path,
    strip_wrappers,
    tensors_of,
)
from leukolab.errors import LeukolabError
from leukolab.models.backbones import is_vit
from leukolab.models.pos_embed import resample_pos_embed

__all__ = [
    "backbone_spec_of",
    "checkpoint_backbone_spec",
    "extract_backbone_state",
    "load_backbone_state",
    "load_backbone_weights",
    "read_checkpoint",
    "resolve_checkpoint_path",
]


def read_checkpoint(path: Path | str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """A checkpoint file or run folder as a dict (``load_checkpoint``'s trust policy), or a one-line error."""
    path = resolve_checkpoint_path(path)
    obj = load_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(obj, Mapping):
        raise LeukolabError(f"{path}: expected a dict of tensors or a leukolab checkpoint, got {type(obj).__name__}")
    return dict(obj)


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _patch_of(name: str, kwargs: Mapping[str, Any]) -> int | None:
    patch = kwargs.get("patch_size")
    if patch is not None:
        return int(patch if isinstance(patch, int) else patch[0])
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else None


def backbone_spec_of(state: Mapping[str, Any]) -> BackboneSpec | None:
    """The :class:`BackboneSpec` recorded in a loaded checkpoint (None for foreign files).

    Read from the ``backbone_spec`` entry; checkpoints written before it
    existed are understood too: pretraining ones name the backbone in
    ``backbone_name`` (with ``img_size`` and ``backbone_kwargs``),
    classification ones carry the run's ``config``, both with leukolab's
    normalisation; older converted backbones carry ``backbone_config`` (ImageNet).
    Build the backbone with ``create_backbone(spec.name, spec.img_size, **spec.kwargs)``.
    """
    if isinstance(spec := state.get("backbone_spec"), Mapping) and spec.get("name"):
        return BackboneSpec.from_dict(spec)
    if isinstance(state.get("backbone_name"), str):
        name = state["backbone_name"]
        size = state.get("img_size") or _get(state, "config", "data", "img_size")
        kwargs = state.get("backbone_kwargs") or _get(state, "config", "model", "backbone_kwargs")
    elif isinstance(name := _get(state, "config", "model", "backbone"), str):
        size = _get(state, "config", "data", "img_size") or state.get("img_size")
        kwargs = _get(state, "config", "model", "backbone_kwargs") or state.get("backbone_kwargs")
    elif isinstance(config := state.get("backbone_config"), Mapping):
        from leukolab.zoo.convert import spec_from_vit_config

        fmt = state.get("source_format") or state.get("format")
        return spec_from_vit_config(config, fmt if isinstance(fmt, str) else None)
    else:
        return None
    kwargs = dict(kwargs or {})
    return BackboneSpec(name, kwargs, int(size) if size else None, _patch_of(name, kwargs))


def checkpoint_backbone_spec(path: Path | str, *, allow_pickle: bool = False) -> BackboneSpec | None:
    """:func:`backbone_spec_of` a checkpoint file or run folder."""
    return backbone_spec_of(read_checkpoint(path, allow_pickle=allow_pickle))


def extract_backbone_state(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint object, wrapper prefixes removed."""
    return strip_wrappers(tensors_of(obj))


def _looks_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> bool:
    own = set(model.state_dict())
    return len(own & set(sd)) >= 0.9 * len(own)


def load_backbone_weights(model: nn.Module, path: Path | str, *, allow_pickle: bool = False) -> dict[str, list[str]]:
    """Load weights from ``path`` (file or run folder) into ``model`` (a headless timm backbone).

    Returns ``{"loaded": [...], "ignored": [...]}``.

    Raises:
        LeukolabError: unreadable file, pickled file without ``allow_pickle``,
            missing keys or shapes that cannot be fitted.
    """
    return load_backbone_state(model, read_checkpoint(path, allow_pickle=allow_pickle), path)


def load_backbone_state(
    model: nn.Module, obj: Mapping[str, Any], where: Path | str = "checkpoint"
) -> dict[str, list[str]]:
    """:func:`load_backbone_weights` for a checkpoint already loaded; ``where`` names it in errors."""
    sd = extract_backbone_state(obj)
    if not sd:
        raise LeukolabError(f"{where}: no tensors found; expected a model state dict")
    sd = _norm_to_fc_norm(sd, model)
    if is_vit(model) and not _looks_timm(sd, model):
        from leukolab.zoo.convert import convert_state_dict

        try:
            sd, report = convert_state_dict(sd, None, model, strict=True)
        except LeukolabError as exc:
            raise LeukolabError(f"{where}: {exc}") from None
        ignored = list(report.dropped)
    else:
        sd, ignored = _fit_timm_state(sd, model, where, backbone_spec_of(obj))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise LeukolabError(
            f"{where}: {len(missing)} backbone key(s) missing, e.g. {', '.join(missing[:3])}; "
            "expected a checkpoint of the same architecture"
        )
    return {"loaded": sorted(sd), "ignored": sorted(set(ignored) | set(unexpected))}


def _norm_to_fc_norm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ViT built with ``global_pool='avg'`` normalises the pooled patch tokens
    (``fc_norm``) instead of every token (``norm``); a checkpoint of the same ViT
    with token pooling starts that ``fc_norm`` from its final ``norm`` (MAE's
    fine-tuning recipe pools this way)."""
    own = model.state_dict()
    if "fc_norm.weight" in own and "fc_norm.weight" not in sd and "norm.weight" in sd and "norm.weight" not in own:
        sd = dict(sd)
        for part in ("weight", "bias"):
            if f"norm.{part}" in sd:
                sd[f"fc_norm.{part}"] = sd.pop(f"norm.{part}")
    return sd


def _fit_timm_state(
    sd: dict[str, torch.Tensor], model: nn.Module, where: Path | str, spec: BackboneSpec | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in sd.items():
        if key not in own:
            ignored.append(key)
            continue
        target = own[key]
        if key == "pos_embed" and value.shape != target.shape and is_vit(model):
            value = _resample_pos_embed(value, model, spec)
        if value.shape != target.shape:
            raise LeukolabError(
                f"{where}: {key} has shape {tuple(value.shape)} but the backbone expects {tuple(target.shape)}; "
                "expected a checkpoint of the same architecture"
            )
        out[key] = value
    return out, ignored


def _resample_pos_embed(pe: torch.Tensor, model: nn.Module, spec: BackboneSpec | None) -> torch.Tensor:
    """The stored grid resampled once to the model's, with the checkpoint's rule (timm's by default)."""
    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    antialias, offset = (spec.interpolate_antialias, spec.interpolate_offset) if spec else (True, 0.0)
    try:
        return resample_pos_embed(pe, list(model.patch_embed.grid_size), num_prefix_tokens=n_prefix,
                                  antialias=antialias, offset=offset)
    except ValueError:  # not a square grid: left for the shape check to report
        return pe
