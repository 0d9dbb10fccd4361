"""What every adapter shares: a frozen timm ViT, hooks on its modules, a config to rebuild it.

An :class:`Adapter` is an ``nn.Module`` that holds only the new, trainable
parameters. It registers forward (pre-)hooks on the backbone's own modules
(``blocks[i].attn.qkv``, ``blocks[i].mlp`` ...) instead of replacing them, so
the backbone keeps timm's module tree and parameter names, its state dict stays
the frozen one (bit for bit), and the adapter's state dict is a small file of
its own. :meth:`Adapter.remove` takes the hooks off again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from leukolab.errors import LeukolabError
from leukolab.models.backbones import is_vit

__all__ = ["Adapter", "count_parameters", "embed_dim", "parameter_summary", "vit_blocks"]


def vit_blocks(backbone: nn.Module, adapter: str) -> list[nn.Module]:
    """The transformer blocks of a timm ViT; a one-line error for any other backbone."""
    if not is_vit(backbone) or not isinstance(backbone.blocks, nn.Sequential | nn.ModuleList) \
            or len(backbone.blocks) == 0:
        raise LeukolabError(
            f"adapter {adapter!r} needs a timm Vision Transformer backbone (patch_embed + blocks); "
            f"got {type(backbone).__name__}"
        )
    return list(backbone.blocks)


def embed_dim(backbone: nn.Module) -> int:
    """Width of a ViT's token stream."""
    return int(getattr(backbone, "embed_dim", None) or backbone.num_features)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``module`` (shared parameters counted once)."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def parameter_summary(module: nn.Module) -> str:
    """``"221,184 of 21,886,080 parameters trainable (1.01 %)"``."""
    trainable, total = count_parameters(module)
    return f"{trainable:,} of {total:,} parameters trainable ({100.0 * trainable / max(1, total):.2f} %)"


def parameter_columns(module: nn.Module, adapter: Adapter | None) -> dict[str, Any]:
    """History columns of a model that may hold an adapter: ``trainable_params``, ``trainable_share`` (of all of
    ``module``'s parameters) and ``adapter`` (``name(option=value, ...)``, or ``none``)."""
    trainable, total = count_parameters(module)
    label = "none"
    if adapter is not None:
        cfg = adapter.config()
        text = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in cfg.items() if k != "name"}
        label = f"{cfg['name']}({', '.join(f'{k}={v}' for k, v in text.items())})"
    return {"trainable_params": trainable, "trainable_share": trainable / max(1, total), "adapter": label}


class Adapter(nn.Module):
    """Trainable parameters hooked into a frozen timm ViT.

    A subclass validates its options, creates its parameters, hooks the
    backbone's modules through :meth:`_hook` / :meth:`_pre_hook` and records its
    options in :attr:`options` (what :meth:`config` returns, so that
    ``ADAPTERS.build(**config, backbone=...)`` rebuilds it).

    Attributes:
        name: the registry name (``lora``, ``prompt`` ...).
        mergeable: whether :meth:`merge` can fold the adapter into the backbone weights.
        options: the keyword arguments that rebuild this adapter.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.options: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def _pre_hook(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        """Take the hooks off the backbone (it computes its frozen function again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def config(self) -> dict[str, Any]:
        """Plain data: ``{"name": ..., **options}``."""
        return {"name": self.name, **self.options}

    def merge(self, backbone_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``backbone_state`` with the adapter folded into its weights (only :attr:`mergeable` adapters)."""
        raise LeukolabError(
            f"adapter {self.name!r} adds modules of its own and cannot be folded into the backbone weights; "
            "only lora can (export --merge)"
        )
