"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2): spread features over the sphere.

``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised rows, ``nn(i)`` the nearest
other row (found without gradient). The same as DINOv2's ``KoLeoLoss`` except
that the distance has no ``eps`` inside the norm. Not in torch or timm.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of the rows of ``x`` (B, D), computed in float32."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    dist_nn = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()
