"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after a frozen ViT block's sublayers.

After the attention and/or the MLP of every block, the sublayer's output ``h``
becomes ``h + up(act(down(h)))`` (before timm's layer scale and the residual
add), through a forward hook on ``blocks[i].attn`` / ``blocks[i].mlp``. The
up-projection starts at zero, so an untrained adapter is the identity.
(Houlsby et al. also train the layer norms; here the backbone stays frozen.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.adapters.base import Adapter, embed_dim, vit_blocks
from leukolab.registry import ADAPTERS

__all__ = ["Bottleneck", "BottleneckAdapter", "check_width"]

#: the sublayers a bottleneck adapter can follow
POSITIONS = ("attn", "mlp")


class Bottleneck(nn.Module):
    """``dim -> hidden -> dim``: down-projection, nonlinearity, zero-initialised up-projection."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = act()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))

    def residual_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the sublayer's output ``h`` becomes ``h + self(h)``."""
        return output + self(output)


def check_width(hidden: int | None, reduction: int, dim: int, adapter: str) -> int:
    """The bottleneck width: ``hidden`` if given, else ``dim // reduction`` (at least 1)."""
    if hidden is None:
        if isinstance(reduction, bool) or int(reduction) != reduction or reduction < 1:
            raise LeukolabError(f"{adapter} reduction {reduction!r}: expected a whole number >= 1 (e.g. 16)")
        return max(1, dim // int(reduction))
    if isinstance(hidden, bool) or int(hidden) != hidden or hidden < 1:
        raise LeukolabError(f"{adapter} hidden width {hidden!r}: expected a whole number >= 1 (e.g. 24)")
    return int(hidden)


@ADAPTERS.register("bottleneck")
class BottleneckAdapter(Adapter):
    """A :class:`Bottleneck` after the attention and/or MLP of every block of a frozen timm ViT.

    Args:
        backbone: a timm Vision Transformer (its weights are not touched).
        hidden: bottleneck width (default ``embed_dim // reduction``).
        reduction: ``embed_dim / hidden`` when ``hidden`` is not given.
        positions: ``attn``, ``mlp`` or both (Houlsby: both).
    """

    name = "bottleneck"

    def __init__(self, backbone: nn.Module, hidden: int | None = None, reduction: int = 16,
                 positions: str | Sequence[str] = POSITIONS) -> None:
        super().__init__()
        blocks = vit_blocks(backbone, self.name)
        dim = embed_dim(backbone)
        width = check_width(hidden, reduction, dim, self.name)
        where = [p.strip() for p in (positions.split(",") if isinstance(positions, str) else positions) if p.strip()]
        if not where or any(p not in POSITIONS for p in where):
            raise LeukolabError(f"bottleneck positions {positions!r}: expected attn, mlp or attn,mlp")
        for i, block in enumerate(blocks):
            missing = [p for p in where if not isinstance(getattr(block, p, None), nn.Module)]
            if missing:
                raise LeukolabError(f"bottleneck adapter: block {i} ({type(block).__name__}) has no "
                                    f"{', '.join(missing)} module; expected timm ViT blocks")
        device = next(backbone.parameters()).device
        self.adapters = nn.ModuleDict({p: nn.ModuleList(Bottleneck(dim, width) for _ in blocks) for p in where}).to(
            device)
        for p in where:
            for block, adapter in zip(blocks, self.adapters[p], strict=True):
                self._hook(getattr(block, p), adapter.residual_hook)
        self.options = {"hidden": width, "reduction": int(reduction), "positions": list(where)}
