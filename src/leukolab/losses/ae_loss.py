"""Pixel reconstruction loss of the convolutional auto-encoder: MSE, L1 or their sum, on normalised pixels.

The terms are torch's own ``F.mse_loss`` / ``F.l1_loss`` (means over every pixel
and channel); this module only picks and logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leukolab.errors import LeukolabError


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse"
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, {"mse": ..., "l1": ...})`` of ``pred`` against ``target`` (same shape).

    ``kind`` is ``mse``, ``l1`` or ``l1+mse`` (the unweighted sum); both terms are logged.
    """
    if pred.shape != target.shape:
        raise LeukolabError(f"reconstruction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()
    mse, l1 = F.mse_loss(pred, target), F.l1_loss(pred, target)
    terms = {"mse": mse, "l1": l1, "l1+mse": mse + l1}
    if kind not in terms:
        raise LeukolabError(f"unknown reconstruction loss {kind!r}; expected one of: mse, l1, l1+mse")
    return terms[kind], {"mse": float(mse.detach()), "l1": float(l1.detach())}
