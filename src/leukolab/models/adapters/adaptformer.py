"""AdaptFormer (Chen et al. 2022): a scaled bottleneck in parallel with each frozen ViT block's MLP.

A timm pre-norm block computes ``x = x + drop_path2(ls2(mlp(norm2(x))))``;
AdaptFormer makes it ``x = x + drop_path2(ls2(mlp(norm2(x)))) + s * up(relu(down(x)))``
-- the bottleneck reads the same residual stream the MLP branch starts from
and is added outside timm's layer scale (so a DINOv2-style ``ls2`` of 1e-5 does
not mute it). Two hooks do it without touching timm's code: a forward pre-hook
on ``norm2`` keeps its input, a forward hook on ``drop_path2`` adds the branch.
The up-projection starts at zero, so an untrained adapter is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.adapters.base import Adapter, embed_dim, vit_blocks
from leukolab.models.adapters.bottleneck import Bottleneck, check_width
from leukolab.registry import ADAPTERS

__all__ = ["AdaptFormer", "ParallelBottleneck"]


class ParallelBottleneck(Bottleneck):
    """A ReLU :class:`Bottleneck` whose output, times ``scale``, is added beside a block's MLP."""

    def __init__(self, dim: int, hidden: int, scale: float) -> None:
        super().__init__(dim, hidden, act=nn.ReLU)
        self.scale = float(scale)
        self._input: torch.Tensor | None = None

    def keep_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on ``norm2``: remember the residual stream the MLP branch starts from."""
        self._input = args[0]

    def add_branch(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook on ``drop_path2``: add ``scale * bottleneck(x)`` to the MLP branch."""
        x, self._input = self._input, None
        if x is None:
            raise RuntimeError("AdaptFormer: the block's drop_path2 ran without its norm2")
        return output + self(x) * self.scale


@ADAPTERS.register("adaptformer")
class AdaptFormer(Adapter):
    """A :class:`ParallelBottleneck` beside the MLP of every block of a frozen timm ViT.

    Args:
        backbone: a timm Vision Transformer with pre-norm blocks (``norm2``, ``mlp``, ``drop_path2``).
        hidden: bottleneck width (default ``embed_dim // reduction``).
        reduction: ``embed_dim / hidden`` when ``hidden`` is not given.
        scale: the fixed factor ``s`` of the branch (the paper's 0.1).
    """

    name = "adaptformer"

    def __init__(self, backbone: nn.Module, hidden: int | None = None, reduction: int = 16,
                 scale: float = 0.1) -> None:
        super().__init__()
        blocks = vit_blocks(backbone, self.name)
        dim = embed_dim(backbone)
        width = check_width(hidden, reduction, dim, self.name)
        if not float(scale) > 0:
            raise LeukolabError(f"adaptformer scale {scale!r}: expected a number > 0 (e.g. 0.1)")
        for i, block in enumerate(blocks):
            missing = [a for a in ("norm2", "mlp", "drop_path2") if not isinstance(getattr(block, a, None), nn.Module)]
            if missing or isinstance(block, ResPostBlock):  # a post-norm block's norm2 reads the MLP's output
                what = f"has no {', '.join(missing)}" if missing else "is post-norm"
                raise LeukolabError(f"adaptformer: block {i} ({type(block).__name__}) {what}; "
                                    "expected timm's pre-norm ViT Block")
        device = next(backbone.parameters()).device
        self.adapters = nn.ModuleList(ParallelBottleneck(dim, width, scale) for _ in blocks).to(device)
        for block, adapter in zip(blocks, self.adapters, strict=True):
            self._pre_hook(block.norm2, adapter.keep_input)
            self._hook(block.drop_path2, adapter.add_branch)
        self.options = {"hidden": width, "reduction": int(reduction), "scale": float(scale)}
