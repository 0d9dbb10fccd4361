"""Look inside a ViT: last-block attention maps and PCA of the patch features.

:func:`attention_maps` recomputes the attention weights of the last block with
plain PyTorch (no reliance on fused attention kernels returning weights): a
forward pre-hook on ``model.blocks[-1].attn`` (a timm ``Attention``) captures
its input, from which ``q`` and ``k`` are recomputed through ``attn.qkv``,
``attn.q_norm`` and ``attn.k_norm``, scaled by ``attn.scale`` and
soft-maxed over **all** keys (prefix and patch tokens). The maps returned
are the *patch part* of the rows of the prefix tokens (class token first,
then the registers), so a map sums to the share of attention that token gives
to the patches, at most 1. Prompt tokens of a prompt-tuned ViT (``--adapter
prompt``, shallow or deep), which exist only inside the blocks between the
prefix and the patches, are told apart by the sequence length the block sees
against the one the model returns, and left out of the maps.

:func:`pca_rgb` is the visualisation of the DINOv2 papers: the first three
principal components of the patch features (fitted over all images shown) as
RGB, with the background removed by thresholding the first component and a
second PCA fitted on the foreground patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.tokens import patch_grid, require_vit
from leukolab.utils.files import atomic_write

__all__ = [
    "attention_maps",
    "attention_weights",
    "inserted_tokens",
    "last_block_attention",
    "pca_rgb",
    "plot_attention_grid",
    "plot_pca_grid",
]


def attention_weights(attn: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention weights ``(B, heads, N, N)`` of a timm ``Attention`` module for its input ``x``.

    Recomputed from ``attn.qkv``, ``attn.q_norm``, ``attn.k_norm`` and
    ``attn.scale`` exactly as timm's non-fused path does; each row sums to one.
    """
    for name in ("qkv", "num_heads", "scale"):
        if not hasattr(attn, name):
            raise LeukolabError(
                f"attention maps need timm's Attention with a fused qkv projection; "
                f"{type(attn).__name__} has no {name!r}"
            )
    B, N, _ = x.shape
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // 3 // heads)
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def last_block_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (B, heads, N, N), block input of attn (B, N, C))`` of the last block for images ``x``.

    ``N`` counts every token the block sees, prompt tokens of a prompt adapter included
    (see :func:`inserted_tokens`).
    """
    weights, inp, _ = _last_block(model, x)
    return weights, inp


def inserted_tokens(n_block: int, n_out: int) -> int:
    """Tokens that live only inside the blocks: ``n_block`` (what the last block's attention sees) minus
    ``n_out`` (what the ViT's ``forward_features`` returns). Visual prompt tuning
    (:class:`leukolab.models.adapters.prompt.PromptTuning`, shallow or deep) inserts its prompts after the
    prefix tokens at each block and takes them out again, so they are tokens ``P .. P + n - 1`` of the block.

    Raises:
        LeukolabError: the block sees fewer tokens than the model returns (an unknown layout).
    """
    extra = int(n_block) - int(n_out)
    if extra < 0:
        raise LeukolabError(f"the last block sees {n_block} tokens but the ViT returns {n_out}; "
                            "cannot tell its patch tokens apart")
    return extra


@torch.no_grad()
def _last_block(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`last_block_attention` and the number of tokens ``forward_features`` returned."""
    require_vit(model, "attention maps")
    attn = model.blocks[-1].attn
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["x"] = args[0] if args else kwargs["x"]
        captured["mask"] = kwargs.get("attn_mask")

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model.forward_features(x)
    finally:
        handle.remove()
    if "x" not in captured:
        raise LeukolabError("the last block's attention was never called; cannot compute attention maps")
    return attention_weights(attn, captured["x"], captured["mask"]), captured["x"], int(out.shape[1])


def attention_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-block attention of the prefix tokens to the patches, ``(B, 1 + n_reg, heads, grid_h, grid_w)``.

    Query tokens are the prefix tokens in model order (class token, then the
    registers; see :func:`leukolab.models.tokens.prefix_token_names`). The attention rows are
    soft-maxed over all keys, prefix, prompt and patch tokens, so they sum to one
    over all keys; the returned maps are the patch part only (each sums to at
    most one: the rest went to prefix tokens and, with a prompt adapter, to its
    prompts, which sit between the prefix and the patches; see :func:`inserted_tokens`).

    Raises:
        LeukolabError: not a ViT, or a ViT without class/register tokens.
    """
    model.eval()
    weights, _, n_out = _last_block(model, x)
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if n_prefix == 0:
        raise LeukolabError("this ViT has no class or register tokens whose attention could be shown")
    B, H, N, _ = weights.shape
    start = n_prefix + inserted_tokens(N, n_out)  # the first patch token: after the prefix and any prompts
    gh, gw = patch_grid(model, x, N - start)
    maps = weights[:, :, :n_prefix, start:]  # (B, H, P, patches)
    return maps.permute(0, 2, 1, 3).reshape(B, n_prefix, H, gh, gw).contiguous()


def _save_png(fig: plt.Figure, path: Path | str) -> Path:
    """Write ``fig`` as a new PNG (atomically; an existing file is refused) and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _minmax(a: np.ndarray, axis: int | None = 0) -> np.ndarray:
    lo = a.min(axis=axis, keepdims=True)
    hi = a.max(axis=axis, keepdims=True)
    return (a - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)


def pca_rgb(
    feats: torch.Tensor | np.ndarray, threshold: float | None = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """First three principal components of patch features as RGB, background removed.

    Args:
        feats: ``(B, grid_h, grid_w, D)`` patch features; one PCA over all images.
        threshold: foreground where the first component, scaled to [0, 1],
            exceeds it (its sign is chosen so the image centre, where the cell
            sits in WBC crops, is high). The RGB of the foreground comes from a
            second PCA fitted on foreground patches only; background is black.
            ``None`` keeps every patch.

    Returns:
        ``(rgb (B, grid_h, grid_w, 3) in [0, 1], foreground mask (B, grid_h, grid_w))``.
    """
    from sklearn.decomposition import PCA

    arr = feats.detach().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats)
    if arr.ndim != 4:
        raise LeukolabError(f"patch features must be (B, grid_h, grid_w, D), got shape {arr.shape}")
    B, gh, gw, D = arr.shape
    flat = arr.reshape(-1, D).astype(np.float64)
    if flat.shape[0] < 2:
        raise LeukolabError("PCA needs at least 2 patches")
    k = min(3, flat.shape[0], D)
    comp = PCA(n_components=k, random_state=0).fit_transform(flat)
    first = _minmax(comp[:, 0], axis=None).reshape(B, gh, gw)
    inner = np.zeros((gh, gw), dtype=bool)
    inner[gh // 4 : gh - gh // 4, gw // 4 : gw - gw // 4] = True
    if (~inner).any() and first[:, inner].mean() < first[:, ~inner].mean():
        first = 1.0 - first
    mask = first > threshold if threshold is not None else np.ones_like(first, dtype=bool)
    rgb = np.zeros((B * gh * gw, 3))
    fg = mask.reshape(-1)
    if fg.sum() >= 2:
        k2 = min(3, int(fg.sum()), D)
        comp_fg = PCA(n_components=k2, random_state=0).fit_transform(flat[fg])
        rgb[fg, :k2] = _minmax(comp_fg, axis=0)
    return rgb.reshape(B, gh, gw, 3), mask


def _to_display(img: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float64)
    return arr / 255.0 if arr.max() > 1.0 else arr


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(m, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def plot_attention_grid(
    image: np.ndarray | torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    path: Path | str,
    token_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """One PNG: a row per query token (image, head mean, each head) with the map over the image.

    ``maps`` is ``(n_tokens, heads, grid_h, grid_w)`` from :func:`attention_maps`;
    each panel is min-max scaled, its title gives the share of attention
    that went to the patches.
    """
    img = _to_display(image)
    m = maps.detach().cpu().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    n_tok, heads = m.shape[:2]
    names = list(token_names or [f"token{i}" for i in range(n_tok)])
    cols = 2 + heads
    fig, axes = plt.subplots(n_tok, cols, figsize=(1.7 * cols, 1.85 * n_tok + 0.4), squeeze=False)
    size = img.shape[:2]
    for r in range(n_tok):
        panels = [("image", None), ("head mean", m[r].mean(0))] + [(f"head {h}", m[r, h]) for h in range(heads)]
        for c, (label, amap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img)
            if amap is None:
                ax.set_title(names[r], fontsize=9, fontweight="bold")
            else:
                ax.imshow(_minmax(_upsample(amap, size), axis=None), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
                ax.set_title(f"{label} ({amap.sum():.2f})", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title or "last-block attention to patches (in brackets: share of attention on patches)",
                 fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_pca_grid(
    images: Sequence[np.ndarray | torch.Tensor],
    rgb: np.ndarray,
    path: Path | str,
    names: Sequence[str] | None = None,
    per_row: int = 4,
) -> Path:
    """Image / PCA-RGB pairs, ``per_row`` pairs a row, one PNG."""
    n = len(images)
    rows = (n + per_row - 1) // per_row
    cols = 2 * min(per_row, n)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, per_row)
        a_img, a_pca = axes[r, 2 * c], axes[r, 2 * c + 1]
        a_img.imshow(_to_display(images[i]))
        a_pca.imshow(rgb[i], interpolation="nearest")
        if names is not None:
            a_img.set_title(str(names[i])[:24], fontsize=7)
        a_pca.set_title("PCA", fontsize=7)
    fig.suptitle("patch features: first 3 principal components as RGB (background removed)", fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)
