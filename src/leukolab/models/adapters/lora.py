"""LoRA (Hu et al. 2021): a low-rank update ``W + (alpha / r) B A`` of chosen linear layers of a frozen ViT.

Each targeted ``nn.Linear`` (``qkv`` and ``proj`` of every block by default)
gets a forward hook adding ``(alpha / r) * B(A(dropout(x)))`` to its output;
``A`` starts Kaiming-uniform and ``B`` at zero, so an untrained adapter leaves the
model's outputs exactly as they were. :meth:`LoRA.merge` folds the update into
the weights, giving a plain timm state dict.

Why not HF ``peft`` (which does apply LoRA to timm ViTs): it pulls
``transformers``, ``accelerate``, ``tokenizers`` and ``regex`` into the install
(measured in the README design notes) for what is ~100 lines here, and its
prompt methods do not work on timm models anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.adapters.base import Adapter, vit_blocks
from leukolab.registry import ADAPTERS

__all__ = ["LoRA", "LoRALayer", "parse_targets"]


class LoRALayer(nn.Module):
    """The low-rank update of one ``in_features -> out_features`` linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and the LoRA reference code)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``scaling * B A x`` (what the hook adds to the layer's output)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self(args[0])

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, shaped like the layer's weight."""
        return (self.lora_B @ self.lora_A) * self.scaling


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """``"qkv,proj"`` or ``["qkv", "proj"]`` -> ``("qkv", "proj")``."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = tuple(str(t).strip() for t in items if str(t).strip())
    if not out:
        raise LeukolabError("LoRA targets are empty; expected layer names such as qkv,proj")
    return out


def _block_linears(blocks: list[nn.Module]) -> list[tuple[str, str, nn.Linear]]:
    """``(full name, name inside the block, layer)`` of every linear layer of the blocks."""
    return [(f"blocks.{i}.{n}", n, m) for i, blk in enumerate(blocks) for n, m in blk.named_modules()
            if isinstance(m, nn.Linear)]


@ADAPTERS.register("lora")
class LoRA(Adapter):
    """Low-rank updates of the linear layers of a frozen timm ViT's blocks named by ``targets``.

    Args:
        backbone: a timm Vision Transformer (its weights are not touched).
        rank: the rank ``r`` of each update (> 0).
        alpha: the update is scaled by ``alpha / rank``.
        targets: names of linear layers inside each block, matched as the full name
            (``attn.qkv``) or its last part(s) (``qkv``); every target must match.
        dropout: dropout on the update's input.
    """

    name = "lora"
    mergeable = True

    def __init__(self, backbone: nn.Module, rank: int = 8, alpha: float = 16.0,
                 targets: str | Sequence[str] = ("qkv", "proj"), dropout: float = 0.0) -> None:
        super().__init__()
        blocks = vit_blocks(backbone, self.name)
        if isinstance(rank, bool) or int(rank) != rank or rank <= 0:
            raise LeukolabError(f"LoRA rank {rank!r}: expected a whole number > 0 (e.g. 8)")
        if alpha <= 0:
            raise LeukolabError(f"LoRA alpha {alpha!r}: expected a number > 0 (e.g. 16)")
        if not 0.0 <= dropout < 1.0:
            raise LeukolabError(f"LoRA dropout {dropout!r}: expected 0 <= dropout < 1")
        wanted = parse_targets(targets)
        linears = _block_linears(blocks)
        chosen: dict[str, nn.Linear] = {}
        for target in wanted:
            hits = [(full, m) for full, inner, m in linears if inner == target or inner.endswith("." + target)]
            if not hits:
                names = ", ".join(sorted({inner for _, inner, _ in linears}))
                raise LeukolabError(f"LoRA target {target!r} matches no linear layer of the ViT blocks; "
                                    f"expected some of: {names}")
            chosen.update(hits)
        self.rank, self.scaling = int(rank), float(alpha) / int(rank)
        self.targets = [full for full, _, _ in linears if full in chosen]  # in model order
        self.layers = nn.ModuleDict()
        for full in self.targets:
            layer = chosen[full]
            lora = LoRALayer(layer.in_features, layer.out_features, self.rank, self.scaling, dropout)
            self.layers[full.replace(".", "-")] = lora.to(layer.weight.device)
            self._hook(layer, lora.hook)
        self.options = {"rank": self.rank, "alpha": float(alpha), "targets": list(wanted), "dropout": float(dropout)}

    def merge(self, backbone_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of the frozen backbone's (timm-named) state dict with every update folded in:
        ``W <- W + (alpha / r) B A`` (computed in float32, stored in the weight's dtype)."""
        out = dict(backbone_state)
        for full in self.targets:
            key = f"{full}.weight"
            if key not in out:
                raise LeukolabError(f"cannot merge LoRA: the backbone state has no {key}")
            w = out[key]
            delta = self.layers[full.replace(".", "-")].delta_weight().detach().to(w.device, torch.float32)
            out[key] = (w.float() + delta).to(w.dtype)
        return out
