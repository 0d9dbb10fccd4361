"""Reading tokens out of a timm ViT: prefix (class + register) tokens, patch tokens, pooled embeddings.

A timm ``VisionTransformer`` puts ``num_prefix_tokens`` tokens in front of
the patches: the class token (when ``cls_token`` exists), then
``num_reg_tokens`` registers. :func:`split_tokens` separates the two parts,
so registers never leak into a patch mean. Intermediate blocks are read with
timm's own ``forward_intermediates`` rather than with hooks. Other backbones
(CNNs) give their pooled features whatever is asked.
"""

from __future__ import annotations

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.backbones import is_vit

__all__ = [
    "POOLS",
    "check_layer",
    "check_pool",
    "num_prefix_tokens",
    "num_reg_tokens",
    "patch_features",
    "patch_grid",
    "pool_features",
    "prefix_token_names",
    "require_vit",
    "split_tokens",
]

#: pooling modes of :func:`pool_features`
POOLS = ("cls", "mean", "both")


def num_prefix_tokens(model: nn.Module) -> int:
    """Class plus register tokens in front of the patches (0 for non-ViTs)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0) if is_vit(model) else 0


def num_reg_tokens(model: nn.Module) -> int:
    """Register tokens of a ViT (0 for non-ViTs)."""
    return int(getattr(model, "num_reg_tokens", 0) or 0) if is_vit(model) else 0


def prefix_token_names(model: nn.Module) -> list[str]:
    """Names of the prefix tokens in order: ``cls``, ``reg0``, ``reg1`` ... (``prefixK`` otherwise)."""
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    names: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        names.append("cls")
    n_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    names += [f"reg{i}" for i in range(n_reg)]
    names += [f"prefix{i}" for i in range(len(names), n_prefix)]
    return names[:n_prefix]


def split_tokens(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prefix (B, P, D), patches (B, N, D))`` of a ViT's ``(B, P + N, D)`` token sequence."""
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return tokens[:, :n_prefix], tokens[:, n_prefix:]


def patch_grid(model: nn.Module, x: torch.Tensor, n_patches: int) -> tuple[int, int]:
    """``(grid_h, grid_w)`` that ``n_patches`` patch tokens of input ``x`` lie on."""
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    if gh * gw != n_patches:
        grid = tuple(getattr(model.patch_embed, "grid_size", ()) or ())
        if len(grid) == 2 and grid[0] * grid[1] == n_patches:
            return int(grid[0]), int(grid[1])
        raise LeukolabError(f"cannot lay {n_patches} patch tokens out on a grid for input {tuple(x.shape[-2:])}")
    return gh, gw


def check_layer(model: nn.Module, layer: int) -> int:
    """The block index (0-based) that ``layer`` names; negative counts from the last block."""
    depth = len(getattr(model, "blocks", []))
    if isinstance(layer, bool) or not -depth <= int(layer) < depth:
        raise LeukolabError(f"--layer {layer!r}: this ViT has {depth} blocks; expected -{depth} .. {depth - 1}")
    return int(layer) % depth


def check_pool(pool: str) -> str:
    """``pool`` if it is one of :data:`POOLS`, else a one-line error."""
    if pool not in POOLS:
        raise LeukolabError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    return pool


def pool_features(
    model: nn.Module, x: torch.Tensor, pool: str = "cls", layer: int = -1, final_norm: bool = True
) -> torch.Tensor:
    """``(B, D)`` (``(B, 2D)`` for ``both``) embeddings of a batch.

    ViTs: the tokens after block ``layer`` (default the last), passed through
    the model's final LayerNorm unless ``final_norm`` is false (then the raw
    residual stream, as timm's ``forward_intermediates(norm=False)`` gives
    it). ``cls`` takes the class token, ``mean`` averages the patch tokens
    (registers skipped), ``both`` concatenates the two. Other backbones: their
    pooled features (``model(x)``), whatever ``pool``, ``layer`` and
    ``final_norm`` say.
    """
    check_pool(pool)
    if not is_vit(model):
        return model(x).flatten(1)
    if pool in ("cls", "both") and getattr(model, "cls_token", None) is None:
        raise LeukolabError("this ViT has no class token; use --pool mean")
    index = check_layer(model, layer)
    if index == len(model.blocks) - 1 and final_norm:
        prefix, patches = split_tokens(model, model.forward_features(x))
    else:
        ((patches, prefix),) = model.forward_intermediates(
            x, indices=[index], norm=final_norm, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=True,
        )
    out = []
    if pool in ("cls", "both"):
        out.append(prefix[:, 0])
    if pool in ("mean", "both"):
        out.append(patches.mean(dim=1))
    return torch.cat(out, dim=1)


def require_vit(model: nn.Module, what: str) -> None:
    """A one-line error unless ``model`` is a timm Vision Transformer."""
    if not is_vit(model) or not hasattr(model, "forward_features"):
        raise LeukolabError(f"{what} needs a Vision Transformer backbone, got {type(model).__name__}")


@torch.no_grad()
def patch_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final, normalised patch tokens ``(B, grid_h, grid_w, D)`` of a ViT."""
    require_vit(model, "patch features")
    model.eval()
    _, patches = split_tokens(model, model.forward_features(x))
    gh, gw = patch_grid(model, x, patches.shape[1])
    return patches.reshape(x.shape[0], gh, gw, -1).float()
