"""Load backbone weights from a local file into a timm backbone.

Accepted: a leukolab run folder or checkpoint (its ``backbone`` entry, stored
in timm naming), a plain timm state dict, or a released DINOv2 / DinoBloom /
HF-ViTMAE ViT file (mapped by :mod:`leukolab.zoo.convert`). Shapes that do not
fit and required keys that are missing are refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.backbones import is_vit

WRAPPER_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "model.", "encoder.")


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A run folder resolves to its ``best.pt`` (else ``last.pt``); a file to itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt", "backbone.pt"):
            if (path / name).is_file():
                return path / name
        raise LeukolabError(f"{path}: no best.pt or last.pt in this folder; expected a leukolab run folder")
    if not path.is_file():
        raise LeukolabError(f"checkpoint {path} does not exist")
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """``torch.load`` a local checkpoint on CPU, or a one-line error."""
    path = resolve_checkpoint_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LeukolabError(
            f"cannot read checkpoint {path} ({exc.__class__.__name__}); expected a torch .pt/.pth file"
        ) from None
    if not isinstance(obj, dict):
        raise LeukolabError(f"{path}: expected a dict of tensors or a leukolab checkpoint, got {type(obj).__name__}")
    return obj


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def backbone_spec_of(state: dict[str, Any]) -> dict[str, Any]:
    """``{backbone, backbone_kwargs, img_size}`` recorded in a loaded leukolab checkpoint ({} for foreign ones).

    Pretraining checkpoints name the backbone in ``backbone_name`` (with ``img_size`` and
    ``backbone_kwargs``, ``reg_tokens`` included); classification checkpoints carry the run's
    ``config``. Build the matching backbone with ``create_backbone(spec["backbone"],
    spec["img_size"], **spec["backbone_kwargs"])``; ``img_size`` is None when not recorded.
    """
    if isinstance(state.get("backbone_name"), str):
        name = state["backbone_name"]
        size = state.get("img_size") or _get(state, "config", "data", "img_size")
        kwargs = state.get("backbone_kwargs") or _get(state, "config", "model", "backbone_kwargs")
    elif isinstance(name := _get(state, "config", "model", "backbone"), str):
        size = _get(state, "config", "data", "img_size") or state.get("img_size")
        kwargs = _get(state, "config", "model", "backbone_kwargs") or state.get("backbone_kwargs")
    else:
        return {}
    return {"backbone": name, "backbone_kwargs": dict(kwargs or {}), "img_size": size}


def checkpoint_backbone_spec(path: Path | str) -> dict[str, Any]:
    """:func:`backbone_spec_of` a checkpoint file or run folder."""
    return backbone_spec_of(read_checkpoint(path))


def extract_backbone_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint object, wrapper prefixes removed."""
    if isinstance(obj.get("backbone"), dict):
        sd = obj["backbone"]
    else:
        sd = obj
        for key in ("teacher", "model", "state_dict", "student"):
            if isinstance(sd.get(key), dict) and any(torch.is_tensor(v) for v in sd[key].values()):
                sd = sd[key]
                break
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _looks_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> bool:
    own = set(model.state_dict())
    return len(own & set(sd)) >= 0.9 * len(own)


def load_backbone_weights(model: nn.Module, path: Path | str) -> dict[str, list[str]]:
    """Load weights from ``path`` into ``model`` (a headless timm backbone).

    Returns ``{"loaded": [...], "ignored": [...]}``. Raises
    :class:`LeukolabError` for missing keys or shapes that cannot be fitted.
    """
    obj = read_checkpoint(path)
    sd = extract_backbone_state(obj)
    if not sd:
        raise LeukolabError(f"{path}: no tensors found; expected a model state dict")
    sd = _norm_to_fc_norm(sd, model)
    if is_vit(model) and not _looks_timm(sd, model):
        from leukolab.zoo.convert import convert_state_dict

        sd, report = convert_state_dict(sd, None, model, strict=True)
        ignored = list(report.dropped)
    else:
        sd, ignored = _fit_timm_state(sd, model, path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise LeukolabError(
            f"{path}: {len(missing)} backbone key(s) missing, e.g. {', '.join(missing[:3])}; "
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
    sd: dict[str, torch.Tensor], model: nn.Module, path: Path | str
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
            value = _resample_pos_embed(value, model)
        if value.shape != target.shape:
            raise LeukolabError(
                f"{path}: {key} has shape {tuple(value.shape)} but the backbone expects {tuple(target.shape)}; "
                "expected a checkpoint of the same architecture"
            )
        out[key] = value
    return out, ignored


def _resample_pos_embed(pe: torch.Tensor, model: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    return resample_abs_pos_embed(pe, list(model.patch_embed.grid_size), num_prefix_tokens=n_prefix)
