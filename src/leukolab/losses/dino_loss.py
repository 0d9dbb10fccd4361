"""The DINO loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Algorithm 1 of the paper with multi-crop: the teacher's outputs of the global
crops are centred (minus an EMA ``center`` of the teacher outputs) and sharpened
(temperature ``teacher_temp``) into target distributions; every student crop
(temperature ``student_temp``) is matched to every teacher crop of a *different*
view by cross-entropy, and the loss is the mean over those pairs. The centre is
updated after the loss, from the mean teacher output of the batch (over all
processes under DDP). Shaped like lightly's ``loss/dino_loss.py``: the loss owns
its centre buffer; the teacher temperature schedule stays with the caller.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions of different views.

    Args:
        out_dim: width of the head outputs (number of prototypes).
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the centre.
        n_global: crops the teacher sees (the first ``n_global`` views of the batch).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, n_global: int = 2):
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.n_global = int(n_global)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, teacher probabilities)`` for view-major outputs.

        ``student_out`` is ``(n_views * B, K)`` (all crops, view after view),
        ``teacher_out`` is ``(n_global * B, K)``; both are cast to float32. The
        centre is not changed here (see :meth:`update_center`).
        """
        n_views = student_out.shape[0] * self.n_global // teacher_out.shape[0]
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_views)
        probs = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        total = student_out.new_zeros((), dtype=torch.float32)
        pairs = 0
        for iq, q in enumerate(probs.chunk(self.n_global)):
            for v in range(n_views):
                if v == iq:
                    continue
                total = total + torch.sum(-q * logp[v], dim=-1).mean()
                pairs += 1
        return total / pairs, probs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher_out)`` (averaged over processes under DDP)."""
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)
