"""Resampling a ViT's absolute position grid to another image size.

A ViT trained at one size keeps one grid of position embeddings; at another
size the grid is interpolated. Two rules are in use, and both are settings of
:func:`resample_grid`:

* timm's default (:func:`timm.layers.resample_abs_pos_embed`, also what its
  ``dynamic_img_size`` does): bicubic to the exact new size, with
  antialiasing (``antialias=True, offset=0``);
* facebookresearch/dinov2's run-time ``interpolate_pos_encoding``: bicubic
  with the scale factor ``(new + offset) / old`` instead of an output size.
  Its released models without registers use ``antialias=False, offset=0.1``
  (the ``DinoVisionTransformer`` defaults); those with registers are built
  by ``hub/backbones.py`` with ``antialias=True, offset=0`` (timm's rule).

DINOv2 always interpolates from the grid it was trained with, so a
converted model reproduces its features at any size only when it is
resampled once from that original grid (never from an already resampled one).
:class:`leukolab.checkpoints.BackboneSpec` records the rule
(``interpolate_antialias``, ``interpolate_offset``) next to the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["grid_of_length", "resample_grid", "resample_pos_embed"]


def grid_of_length(n: int) -> tuple[int, int] | None:
    """The square ``(side, side)`` grid of ``n`` positions, or ``None`` when ``n`` is no square."""
    side = math.isqrt(n) if n > 0 else 0
    return (side, side) if side and side * side == n else None


def resample_grid(
    patch_pos: torch.Tensor,
    new_grid: tuple[int, int] | list[int],
    old_grid: tuple[int, int] | list[int] | None = None,
    *,
    antialias: bool = True,
    offset: float = 0.0,
) -> torch.Tensor:
    """Bicubically resample ``(1, old_h * old_w, C)`` patch positions to ``(1, new_h * new_w, C)``.

    Args:
        patch_pos: the patch positions only (no class or register positions), row-major.
        new_grid: ``(rows, cols)`` wanted.
        old_grid: ``(rows, cols)`` of ``patch_pos``; default the square grid of its length.
        antialias: antialias when shrinking (torch's separable antialiased bicubic).
        offset: 0 interpolates to the exact output size; otherwise the scale factor is
            ``(new + offset) / old`` per side, DINOv2's ``interpolate_offset``.

    The grid is computed in float32 and returned in the input dtype; an
    unchanged grid is returned as it is (DINOv2 does not interpolate then either).
    """
    new_h, new_w = (int(v) for v in new_grid)
    if old_grid is None:
        old_grid = grid_of_length(patch_pos.shape[1])
        if old_grid is None:
            raise ValueError(f"{patch_pos.shape[1]} positions are no square grid; pass old_grid")
    old_h, old_w = (int(v) for v in old_grid)
    if (new_h, new_w) == (old_h, old_w):
        return patch_pos
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    if offset:
        size = {"scale_factor": ((new_h + offset) / old_h, (new_w + offset) / old_w)}
    else:
        size = {"size": (new_h, new_w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size)
    if tuple(grid.shape[-2:]) != (new_h, new_w):  # an offset that is too large or negative
        raise ValueError(f"resampling to {new_h}x{new_w} with offset {offset} gave {tuple(grid.shape[-2:])}")
    return grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(patch_pos.dtype)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int] | list[int],
    *,
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | list[int] | None = None,
    antialias: bool = True,
    offset: float = 0.0,
) -> torch.Tensor:
    """A ``(1, prefix + grid, C)`` position embedding with its grid resampled by :func:`resample_grid`.

    The ``num_prefix_tokens`` leading positions (class, registers) are kept as they are.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = resample_grid(grid, new_grid, old_grid, antialias=antialias, offset=offset)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid
