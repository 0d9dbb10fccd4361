"""Visual prompt tuning (Jia et al. 2022): learnable tokens that join a frozen ViT's token sequence.

``N`` prompt tokens are inserted after the prefix tokens (class token and
registers) in front of the patch tokens: "shallow" puts one learnable set in
at the first block and lets it flow through the network; "deep" gives every
block its own set, replacing what the previous block made of the last one.

The tokens live only inside the blocks: a forward pre-hook on each block
inserts them and a forward hook takes them out again (keeping what the shallow
variant carries to the next block). Everything outside the blocks -- the final
norm, timm's pooling, ``forward_intermediates``, leukolab's prefix/patch split
-- sees the sequence it always saw, so class-token and patch-mean read-outs
work unchanged and registers stay where timm put them. (The shallow variant
carries state from one block to the next, so it does not combine with timm's
gradient checkpointing, which re-runs blocks; leukolab does not use it.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.adapters.base import Adapter, embed_dim, vit_blocks
from leukolab.registry import ADAPTERS

__all__ = ["PromptTuning"]


@ADAPTERS.register("prompt")
class PromptTuning(Adapter):
    """``tokens`` learnable prompt tokens at the input (``deep=False``) or at every block (``deep=True``).

    Args:
        backbone: a timm Vision Transformer (its weights are not touched).
        tokens: prompts per block, 1 .. the number of patch tokens (more prompts
            than image patches would drown the image in the attention).
        deep: one set of prompts per block instead of one at the input.
    """

    name = "prompt"

    def __init__(self, backbone: nn.Module, tokens: int = 10, deep: bool = False) -> None:
        super().__init__()
        blocks = vit_blocks(backbone, self.name)
        n_patches = int(getattr(backbone.patch_embed, "num_patches", 0) or 0)
        if isinstance(tokens, bool) or int(tokens) != tokens or not 1 <= tokens <= max(1, n_patches):
            raise LeukolabError(f"prompt tokens {tokens!r}: expected a whole number from 1 to {n_patches} "
                                f"(the number of patch tokens of this ViT at its image size)")
        dim = embed_dim(backbone)
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.tokens, self.deep = int(tokens), bool(deep)
        device = backbone.patch_embed.proj.weight.device if hasattr(backbone.patch_embed, "proj") else None
        self.prompt_tokens = nn.Parameter(torch.empty(len(blocks) if deep else 1, self.tokens, dim, device=device))
        patch = backbone.patch_embed.patch_size
        area = int(patch[0]) * int(patch[1]) if isinstance(patch, tuple | list) else int(patch) ** 2
        bound = math.sqrt(6.0 / float(3 * area + dim))  # the VPT reference initialisation (Xavier over a patch)
        nn.init.uniform_(self.prompt_tokens, -bound, bound)
        self._carry: torch.Tensor | None = None
        for i, block in enumerate(blocks):
            self._pre_hook(block, _Insert(self, i))
            self._hook(block, _Strip(self, i == len(blocks) - 1))
        self.options = {"tokens": self.tokens, "deep": self.deep}

    def _insert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.deep or index == 0:
            prompts = self.prompt_tokens[index if self.deep else 0].to(x.dtype).expand(x.shape[0], -1, -1)
        else:
            if self._carry is None:
                raise RuntimeError(f"shallow prompts: block {index} ran before block 0")
            prompts = self._carry
        return torch.cat([x[:, : self.prefix], prompts, x[:, self.prefix:]], dim=1)

    def _strip(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        p, n = self.prefix, self.tokens
        self._carry = None if (last or self.deep) else x[:, p: p + n]
        return torch.cat([x[:, :p], x[:, p + n:]], dim=1)


class _Insert:
    """Forward pre-hook of block ``index``: the prompts go in after the prefix tokens."""

    def __init__(self, owner: PromptTuning, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise RuntimeError("prompt tuning expects the block's tokens as its first positional argument")
        return (self.owner._insert(self.index, args[0]), *args[1:])


class _Strip:
    """Forward hook of a block: the prompts come out again (shallow: kept for the next block)."""

    def __init__(self, owner: PromptTuning, last: bool) -> None:
        self.owner, self.last = owner, last

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self.owner._strip(output, self.last)
