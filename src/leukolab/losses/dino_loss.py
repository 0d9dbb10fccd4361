"""The DINO loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Algorithm 1 of the paper with multi-crop: the teacher's outputs of the global
crops are centred (minus an EMA ``center`` of the teacher outputs) and sharpened
(temperature ``teacher_temp``) into target distributions; every student crop
(temperature ``student_temp``) is matched to every teacher crop of a *different*
view by cross-entropy, and the loss is the mean over those pairs. The centre is
updated after the loss, from the mean teacher output of the batch (over all
processes under DDP). Shaped like lightly's ``loss/dino_loss.py``: the loss owns
its centre buffer; the teacher temperature schedule stays with the caller.

``centering="sinkhorn"`` replaces centre-and-softmax by Sinkhorn–Knopp
(:func:`leukolab.losses.sinkhorn.sinkhorn_knopp`, DINOv2); the centre is then
still tracked, but only as a diagnostic. :meth:`DINOLoss.diagnostics` gives the
cheap per-step numbers that tell a learning teacher from a uniform or collapsed one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from leukolab.losses.sinkhorn import sinkhorn_knopp

#: how teacher outputs become targets: a running centre + softmax (DINO) or Sinkhorn–Knopp (DINOv2)
CENTERINGS = ("center", "sinkhorn")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the distributions in the last dimension of ``probs``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions of different views.

    Args:
        out_dim: width of the head outputs (number of prototypes).
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the centre.
        n_global: crops the teacher sees (the first ``n_global`` views of the batch).
        centering: ``center`` (running centre, then softmax) or ``sinkhorn`` (Sinkhorn–Knopp).
        sinkhorn_iterations: Sinkhorn–Knopp iterations (DINOv2: 3).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, n_global: int = 2,
                 centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering {centering!r} is not one of {', '.join(CENTERINGS)}")
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.n_global = int(n_global)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Target distributions (float32, no gradient) of the teacher's outputs."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_out.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, teacher probabilities)`` for view-major outputs.

        ``student_out`` is ``(n_views * B, K)`` (all crops, view after view),
        ``teacher_out`` is ``(n_global * B, K)``; both are cast to float32. The
        centre is not changed here (see :meth:`update_center`).
        """
        n_views = student_out.shape[0] * self.n_global // teacher_out.shape[0]
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_views)
        probs = self.teacher_probs(teacher_out, teacher_temp)
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
        ema_center_(self.center, teacher_out, self.center_momentum)

    @torch.no_grad()
    def diagnostics(self, student_out: torch.Tensor, teacher_probs: torch.Tensor, loss: torch.Tensor,
                    ) -> dict[str, float]:
        """Cheap numbers that tell a learning teacher from a uniform or collapsed one (one device sync).

        * ``teacher_entropy``: mean entropy of the targets (ln K: uniform).
        * ``student_entropy``: mean entropy of the student's softmax over the global crops.
        * ``teacher_student_kl``: mean KL(teacher || student) over the loss's pairs, i.e. the loss minus the
          teacher entropy (every teacher view is in the same number of pairs).
        * ``center_norm``: L2 norm of the running centre.
        * ``effective_prototypes``: exp of the entropy of the batch-mean target (K: all used, 1: collapsed).
        """
        n = teacher_probs.shape[0]
        student = F.softmax(student_out[:n].detach().float() / self.student_temp, dim=-1)
        t_ent = entropy(teacher_probs).mean()
        values = torch.stack([
            t_ent, entropy(student).mean(), loss.detach().float() - t_ent, self.center.norm(),
            entropy(teacher_probs.mean(0)).exp(),
        ]).tolist()
        names = ("teacher_entropy", "student_entropy", "teacher_student_kl", "center_norm", "effective_prototypes")
        return dict(zip(names, values, strict=True))


@torch.no_grad()
def ema_center_(center: torch.Tensor, outputs: torch.Tensor, momentum: float) -> None:
    """``center <- m * center + (1 - m) * mean of the rows of outputs`` over all processes; no rows: unchanged."""
    rows = outputs.detach().float().reshape(-1, center.shape[-1])
    batch_sum = rows.sum(dim=0, keepdim=True)
    count = torch.tensor(float(rows.shape[0]), device=rows.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
    updated = center * momentum + batch_sum / count.clamp_min(1.0) * (1 - momentum)
    center.copy_(torch.where(count > 0, updated, center))  # no host sync
