"""An adapted backbone in a checkpoint: the small adapter on its own, the frozen backbone by reference.

A checkpoint of an adapter run stores an ``adapter`` entry (:func:`adapter_record`):
the adapter's config and weights, the trainable / total parameter counts, and
which frozen backbone it was trained on -- the ``--init`` file it was loaded
from plus a SHA-256 of the frozen weights. The backbone itself is stored only
when it has no such file (a randomly initialised backbone). :func:`restore_adapted_backbone`
rebuilds the backbone from either, refuses an ``--init`` file whose weights
changed since, and hooks the adapter back in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukolab.checkpoints import BackboneSpec
from leukolab.errors import LeukolabError
from leukolab.models.adapters import Adapter, count_parameters, load_adapter

__all__ = [
    "adapter_record",
    "load_frozen_backbone",
    "reference_backbone",
    "restore_adapted_backbone",
    "weights_fingerprint",
]


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_record(adapter: Adapter, backbone: nn.Module, init: str | None, fingerprint: str) -> dict[str, Any]:
    """Plain data for a checkpoint: the adapter (config + weights), its parameter counts and its frozen backbone.

    ``init`` is the file the frozen backbone was loaded from (``None``: the checkpoint must
    carry the backbone itself); ``fingerprint`` is :func:`weights_fingerprint` of its weights.
    """
    trainable, total = count_parameters(nn.ModuleList([backbone, adapter]))
    return {
        "config": adapter.config(),
        "state": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
        "init": init,
        "backbone_sha256": fingerprint,
        "adapter_params": sum(p.numel() for p in adapter.parameters()),
        "backbone_params": total - trainable,
    }


def load_frozen_backbone(
    backbone: nn.Module, record: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load the frozen weights an adapter was trained on into ``backbone`` (built as the run built it).

    They come from ``backbone_state`` when the checkpoint stores one, else from the ``--init``
    file named in ``record``, which must still hold the same weights (same SHA-256).

    Raises:
        LeukolabError: the ``--init`` file is gone or holds other weights.
    """
    from leukolab.models.weights import load_backbone_weights

    if backbone_state:
        backbone.load_state_dict(dict(backbone_state))
    else:
        init = record.get("init")
        if not init:
            raise LeukolabError("the adapter checkpoint names no --init backbone and stores none; cannot rebuild it")
        if not Path(init).exists():
            raise LeukolabError(f"the frozen backbone of this adapter run, {init}, is gone; expected the --init "
                                "file the run was trained from (export LoRA runs with --merge while it exists)")
        load_backbone_weights(backbone, init)
    want = record.get("backbone_sha256")
    if want and weights_fingerprint(backbone.state_dict()) != want:
        raise LeukolabError(f"the frozen backbone {record.get('init') or '(stored)'} holds other weights than the "
                            "adapter was trained on (SHA-256 differs); expected the unchanged --init file")


def restore_adapted_backbone(
    record: Mapping[str, Any], spec: BackboneSpec, backbone_state: Mapping[str, torch.Tensor] | None = None,
    *, attach: bool = True,
) -> tuple[nn.Module, Adapter]:
    """The frozen backbone of an adapter checkpoint (see :func:`load_frozen_backbone`) with its adapter hooked in.

    With ``attach`` the adapter also becomes the backbone's submodule ``adapter``, so that
    ``.to(device)`` and ``.eval()`` on the backbone carry it along (for embedding; the
    backbone's state dict then holds the adapter's entries too).

    Raises:
        LeukolabError: the ``--init`` file is gone or changed, or the adapter does not fit.
    """
    from leukolab.models.backbones import create_backbone

    backbone = create_backbone(spec.name, spec.img_size or 224, **spec.kwargs)
    load_frozen_backbone(backbone, record, backbone_state)
    adapter = load_adapter(backbone, record["config"], record.get("state"), attach=attach)
    return backbone.eval(), adapter


def reference_backbone(parent: nn.Module, child: str = "backbone") -> None:
    """Keep ``parent.<child>``'s (frozen) weights out of ``parent``'s state dict: checkpoints reference them.

    ``parent.state_dict()`` leaves the child's entries out; ``parent.load_state_dict`` takes a
    state without them (the child keeps the weights it has) as well as one with them.
    """
    def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state if k.startswith(f"{prefix}{child}.")]:
            del state[key]

    def fill(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if not any(k.startswith(f"{prefix}{child}.") for k in state):
            state.update({f"{prefix}{child}.{k}": v for k, v in getattr(parent, child).state_dict().items()})

    parent.register_state_dict_post_hook(drop)
    parent.register_load_state_dict_pre_hook(fill)
