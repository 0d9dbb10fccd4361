"""CenterNet's penalty-reduced pixel-wise focal loss on class heatmaps (Zhou et al. 2019, eq. 1).

With ``p`` the predicted probability and ``y`` the Gaussian-splatted target
(exactly 1 at object centres)::

    L = -1/N * sum_{y=1} (1 - p)^alpha log(p)  +  sum_{y<1} (1 - y)^beta p^alpha log(1 - p)

where ``N`` is the number of centres (pixels with ``y = 1``). It is written here
because torchvision's :func:`torchvision.ops.sigmoid_focal_loss` is the
RetinaNet loss (binary targets, no ``(1 - y)^beta`` reduction near centres).
It works on logits (``logsigmoid``) so that it stays finite for saturated outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmap_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """The loss above, summed over all pixels and classes and divided by ``max(1, N)``.

    Args:
        logits: ``(B, K, H, W)`` heatmap logits.
        target: ``(B, K, H, W)`` targets in [0, 1] with 1 at object centres.
    """
    logits = logits.float()
    target = target.float()
    pos = target.eq(1.0)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_term = ((1.0 - p) ** alpha * log_p)[pos].sum()
    neg_term = ((1.0 - target) ** beta * p**alpha * log_not_p)[~pos].sum()
    return -(pos_term + neg_term) / pos.sum().clamp(min=1)
