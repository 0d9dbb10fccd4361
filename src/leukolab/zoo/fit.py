"""A foreign ViT's tensors, under timm names, fitted onto a timm ``VisionTransformer``.

:func:`read_source` renames a state dict of any known layout
(:mod:`leukolab.zoo.dinov2`, :mod:`leukolab.zoo.hf`) and splits its
position embedding into a class position (if any), register positions (if
any) and the patch grid. :func:`fit_to_model` puts them back the way the
target model wants them:

* the patch grid is resampled once, from the source grid, with the given
  rule (:func:`leukolab.models.pos_embed.resample_grid`: DINOv2's for DINOv2
  checkpoints, timm's otherwise);
* prefix positions stay inside ``pos_embed`` or are folded into
  ``cls_token`` / ``reg_token`` depending on the target's ``no_embed_class``
  (both give the same network function);
* a patch kernel of another size is resampled with timm's ``resample_patch_embed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.pos_embed import grid_of_length, resample_grid
from leukolab.zoo.dinov2 import timm_like_to_timm
from leukolab.zoo.hf import hf_to_timm
from leukolab.zoo.layouts import normalize_keys

__all__ = ["ConversionReport", "SourceViT", "fit_to_model", "read_source"]


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
        notes: anything else worth knowing (guessed head count, matched release,
            layer-norm epsilon differences).
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
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ": " + ", ".join(keys[:limit]) + more


@dataclass
class SourceViT:
    """A checkpoint's tensors under timm names, the position embedding split into pieces.

    Attributes:
        tensors: timm-named tensors except ``pos_embed``.
        sources: the source keys of each entry of ``tensors``.
        dropped: source keys that have no timm counterpart.
        patch_pos: ``(1, rows * cols, C)`` patch positions (``None`` without ``pos_embed``).
        cls_pos: the class-token position, when the source stores one in ``pos_embed``.
        reg_pos: register positions, when the source stores them in ``pos_embed``.
        grid: ``(rows, cols)`` of ``patch_pos``.
        pos_sources: the source keys of the position embedding.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    patch_pos: torch.Tensor | None = None
    cls_pos: torch.Tensor | None = None
    reg_pos: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    pos_sources: list[str] = field(default_factory=list)

    @property
    def swiglu(self) -> bool:
        """SwiGLU MLPs (DINOv2 ViT-g): ``fc1`` is twice as wide as ``fc2``'s input."""
        fc1, fc2 = self.tensors.get("blocks.0.mlp.fc1.weight"), self.tensors.get("blocks.0.mlp.fc2.weight")
        return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def read_source(sd: Mapping[str, torch.Tensor], fmt: str) -> SourceViT:
    """Rename ``sd`` (layout ``fmt``, wrappers allowed) onto timm names and split its position embedding."""
    keys, dropped = normalize_keys(sd)
    tensors = {k: sd[orig] for k, orig in keys.items()}
    renamed, more = hf_to_timm(tensors, keys) if fmt == "hf-vitmae" else timm_like_to_timm(tensors, keys)
    src = SourceViT(dropped=dropped + more)
    pos = renamed.pop("pos_embed", None)
    for key, (value, sources) in renamed.items():
        src.tensors[key], src.sources[key] = value, sources
    if pos is not None:
        _split_pos_embed(pos, src)
    return src


def _split_pos_embed(entry: tuple[torch.Tensor, list[str]], src: SourceViT) -> None:
    pos, sources = entry
    pos = pos.unsqueeze(0) if pos.ndim == 2 else pos
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise LeukolabError(f"{sources[0]} has shape {tuple(pos.shape)}, expected (1, tokens, dim)")
    has_cls = "cls_token" in src.tensors
    regs = src.tensors["reg_token"].shape[1] if "reg_token" in src.tensors else 0
    # timm layout (DINOv2 and HF renamed onto it): positions for all prefix tokens, or for none of them
    for prefix in dict.fromkeys([int(has_cls) + regs, 0]):
        if grid := grid_of_length(pos.shape[1] - prefix):
            break
    else:
        raise LeukolabError(
            f"{sources[0]} has {pos.shape[1]} positions, which is no square patch grid plus "
            f"{int(has_cls) + regs} prefix positions"
        )
    src.grid, src.pos_sources, src.patch_pos = grid, sources, pos[:, prefix:]
    if prefix:
        src.cls_pos = pos[:, :1] if has_cls else None
        src.reg_pos = pos[:, int(has_cls):prefix] if regs else None


def fit_to_model(
    src: SourceViT,
    model: nn.Module,
    *,
    strict: bool = True,
    antialias: bool = True,
    offset: float = 0.0,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Shape ``src`` onto ``model.state_dict()`` (only read, never modified).

    ``antialias`` and ``offset`` are the position-grid resampling rule
    (:func:`leukolab.models.pos_embed.resample_grid`). With ``strict``, model
    keys left unfilled and shapes that cannot be fitted are refused;
    otherwise they are listed in ``report.missing`` / ``report.dropped``.

    Raises:
        LeukolabError: (``strict``) missing keys or shapes that cannot be fitted.
    """
    report = ConversionReport(dropped=list(src.dropped))
    target = model.state_dict()
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    t = dict(src.tensors)
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    has_cls = getattr(model, "cls_token", None) is not None
    n_reg = int(getattr(model, "num_reg_tokens", 0) or 0)

    # class and register tokens, with their positions folded in when the model has none for them
    if "cls_token" in t:
        cls, srcs = t.pop("cls_token"), list(src.sources["cls_token"])
        if has_cls and no_embed_class and src.cls_pos is not None:
            cls, srcs = cls + src.cls_pos, srcs + src.pos_sources
            report.notes.append("class-token position folded into cls_token (model has no_embed_class=True)")
        out["cls_token"] = (cls, srcs)
    if "reg_token" in t:
        reg, srcs = t.pop("reg_token"), list(src.sources["reg_token"])
        if no_embed_class and src.reg_pos is not None and src.reg_pos.shape == reg.shape:
            reg, srcs = reg + src.reg_pos, srcs + src.pos_sources
        out["reg_token"] = (reg, srcs)

    # position embedding: the source grid resampled once, prefix positions where the model keeps them
    if src.patch_pos is not None and "pos_embed" in target:
        new_grid = tuple(int(g) for g in model.patch_embed.grid_size)
        old_grid = src.grid or new_grid
        patch_pos = resample_grid(src.patch_pos, new_grid, old_grid, antialias=antialias, offset=offset)
        if old_grid != new_grid:
            rule = f"offset {offset:g}, " if offset else ""
            report.resized.append(
                f"pos_embed: {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} "
                f"(bicubic, {rule}antialias {'on' if antialias else 'off'})"
            )
        pieces = []
        if not no_embed_class:
            dim = patch_pos.shape[-1]
            if has_cls:
                pieces.append(src.cls_pos if src.cls_pos is not None else patch_pos.new_zeros(1, 1, dim))
            if n_reg:
                fits = src.reg_pos is not None and src.reg_pos.shape[1] == n_reg
                pieces.append(src.reg_pos if fits else patch_pos.new_zeros(1, n_reg, dim))
        out["pos_embed"] = (torch.cat([*pieces, patch_pos], dim=1), src.pos_sources)
    elif src.patch_pos is not None:
        report.dropped.extend(k for k in src.pos_sources if k not in report.dropped)

    # patch embedding: resample the kernel when the patch size differs
    if (w := t.pop("patch_embed.proj.weight", None)) is not None:
        want = target.get("patch_embed.proj.weight")
        if want is not None and w.ndim == 4 and w.shape[:2] == want.shape[:2] and w.shape[2:] != want.shape[2:]:
            from timm.layers import resample_patch_embed

            report.resized.append(
                f"patch_embed.proj.weight: {w.shape[2]}x{w.shape[3]} -> {want.shape[2]}x{want.shape[3]}"
            )
            w = resample_patch_embed(w, list(want.shape[2:]))
        out["patch_embed.proj.weight"] = (w, src.sources["patch_embed.proj.weight"])
    out.update((key, (value, src.sources[key])) for key, value in t.items())
    return _match(out, target, report, strict)


def _match(
    out: dict[str, tuple[torch.Tensor, list[str]]],
    target: dict[str, torch.Tensor],
    report: ConversionReport,
    strict: bool,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    result: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, (value, sources) in out.items():
        if key not in target or tuple(value.shape) != tuple(target[key].shape):
            if key in target:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
            report.dropped.extend(k for k in sources if k not in report.dropped)
            continue
        result[key] = value.to(dtype=target[key].dtype)
        report.mapped.extend((s, key) for s in sources)
    report.missing = [k for k in target if k not in result]
    if strict and mismatched:
        raise LeukolabError(
            f"{len(mismatched)} checkpoint tensors cannot be fitted to the model: {'; '.join(mismatched[:3])}"
            + (" ..." if len(mismatched) > 3 else "")
        )
    if strict and report.missing:
        first = ", ".join(report.missing[:5]) + (", ..." if len(report.missing) > 5 else "")
        raise LeukolabError(
            f"checkpoint is missing {len(report.missing)} keys the model needs ({first}); it does not fit this ViT"
        )
    return result, report
