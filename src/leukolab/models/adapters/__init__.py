"""Parameter-efficient fine-tuning of frozen timm ViTs: LoRA, prompt tuning, bottleneck adapters, AdaptFormer.

Each adapter is one module registered in :data:`leukolab.registry.ADAPTERS`
and hooks a timm ViT's own modules (nothing in timm is replaced or edited)::

    from leukolab.models.adapters import apply_adapter

    adapter = apply_adapter(vit, "lora", rank=8, alpha=16, targets="qkv,proj")   # vit is now frozen
    model = nn.Sequential(vit, head)             # train adapter.parameters() and head.parameters()
    adapter.config()                             # {"name": "lora", "rank": 8, ...}: rebuilds it
    adapter.state_dict()                         # the small file; vit.state_dict() is unchanged
    plain = adapter.merge(vit.state_dict())      # LoRA only: a timm state dict with the update folded in

====================  =====================================================================
``lora``              ``rank``, ``alpha``, ``targets`` (``qkv,proj``), ``dropout``
``prompt``            ``tokens``, ``deep`` (VPT shallow / deep)
``bottleneck``        ``hidden`` or ``reduction``, ``positions`` (``attn,mlp``; Houlsby)
``adaptformer``       ``hidden`` or ``reduction``, ``scale`` (parallel to each MLP)
====================  =====================================================================

:mod:`leukolab.models.adapters.state` is how checkpoints keep an adapter: its
own small entry, with the frozen backbone referenced by its ``--init`` file.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.adapters import adaptformer, bottleneck, lora, prompt  # noqa: F401 - register the adapters
from leukolab.models.adapters.adaptformer import AdaptFormer
from leukolab.models.adapters.base import Adapter, count_parameters, parameter_columns, parameter_summary
from leukolab.models.adapters.bottleneck import BottleneckAdapter
from leukolab.models.adapters.lora import LoRA
from leukolab.models.adapters.prompt import PromptTuning
from leukolab.registry import ADAPTERS

__all__ = [
    "AdaptFormer",
    "Adapter",
    "BottleneckAdapter",
    "LoRA",
    "PromptTuning",
    "apply_adapter",
    "count_parameters",
    "load_adapter",
    "parameter_columns",
    "parameter_summary",
]


def apply_adapter(backbone: nn.Module, name: str, *, attach: bool = False, **kwargs: Any) -> Adapter:
    """Freeze ``backbone`` and hook the adapter ``name`` (built from :data:`ADAPTERS` with ``kwargs``) into it.

    Returns the adapter: the module that holds the trainable parameters. Keep it
    next to the backbone (e.g. as an attribute of the model) so that it moves to
    the device and reaches the optimiser with it -- or pass ``attach=True`` to make
    it the backbone's submodule ``adapter`` (then ``backbone.to()``,
    ``backbone.parameters()`` and ``backbone.state_dict()`` include it: the
    simplest way to hand an adapted encoder to code that expects one module).

    Raises:
        LeukolabError: unknown adapter or option, a backbone that is not a timm ViT,
            or an option out of range (the message names it).
    """
    factory = ADAPTERS.get(name)
    accepted = [p for p in inspect.signature(factory).parameters if p != "backbone"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise LeukolabError(f"adapter {name!r}: unknown option(s) {', '.join(unknown)}; "
                            f"expected some of: {', '.join(accepted)}")
    backbone.requires_grad_(False)
    adapter = ADAPTERS.build(name, backbone=backbone, **kwargs)
    if attach:
        backbone.add_module("adapter", adapter)
    return adapter


def load_adapter(backbone: nn.Module, config: Mapping[str, Any],
                 state: Mapping[str, torch.Tensor] | None = None, *, attach: bool = False) -> Adapter:
    """Rebuild the adapter described by ``config`` (:meth:`Adapter.config`) on ``backbone`` and load ``state``
    (``attach``: as in :func:`apply_adapter`)."""
    options = {k: v for k, v in config.items() if k != "name"}
    if "name" not in config:
        raise LeukolabError(f"adapter config {dict(config)!r} has no name")
    adapter = apply_adapter(backbone, str(config["name"]), **options)
    if state is not None:
        try:
            adapter.load_state_dict(dict(state))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise LeukolabError(f"the saved {config['name']} adapter does not fit this backbone ({first})") from None
    if attach:
        backbone.add_module("adapter", adapter)
    return adapter
