"""Batch-norm statistics re-estimated on another lab's images (AdaBN).

A network trained on one lab's images normalises every BatchNorm layer's input
with that lab's running mean and variance. Li et al. (2016, "Revisiting batch
normalization for practical domain adaptation") replace those statistics with
the target domain's, computed on its *unlabelled* images, and change nothing
else: no weight is trained, no label is needed. :func:`adapt_batchnorm` does
that in place: the running statistics are reset and recomputed as the
cumulative average (``momentum=None``) of the batch statistics of the images it
is given, with every other module in eval mode (dropout and drop-path off).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["adapt_batchnorm", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (in module order)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of ``model`` on ``batches``.

    Each layer's statistics become the equally weighted average over batches of the batch mean and (unbiased)
    variance, as ``nn.BatchNorm`` computes them with ``momentum=None``; the layers' momenta are restored
    afterwards and ``model`` is left in eval mode. Weights, biases and every other buffer are unchanged.

    Returns:
        The number of images seen.

    Raises:
        ValueError: ``model`` has no BatchNorm layer, or ``batches`` is empty.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer")
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("no images to adapt the BatchNorm statistics on")
    return seen
