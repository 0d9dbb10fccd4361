"""The iBOT masked-patch loss (Zhou et al. 2022), as DINOv2's ``iBOTPatchLoss.forward_masked``.

The student sees global crops with some patch embeddings replaced by a mask
token; the teacher sees them whole. At every *masked* position the teacher's
patch prototype scores become a target distribution (centred with this loss's own
running centre and sharpened, or Sinkhorn–Knopp balanced) and the student's
scores there are matched to it by cross-entropy. Each image's masked patches are
averaged (weight ``1 / masked patches of the image``), and the sum over images is
divided by the number of images *including* those left unmasked, exactly as in
DINOv2. Unmasked positions never enter the loss. Not in torch, timm or torchvision;
written after DINOv2's ``dinov2/loss/ibot_patch_loss.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from leukolab.losses.dino_loss import CENTERINGS, ema_center_
from leukolab.losses.sinkhorn import sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch distributions at masked positions.

    Args:
        out_dim: number of patch prototypes.
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the patch centre (``centering="center"``).
        centering: ``center`` or ``sinkhorn``.
        sinkhorn_iterations: Sinkhorn–Knopp iterations.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering {centering!r} is not one of {', '.join(CENTERINGS)}")
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_patch_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets ``(M, K)`` (float32, no gradient) from the teacher's scores at the ``M`` masked positions."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_patch_out, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_patch_out.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_patch_out: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                ) -> torch.Tensor:
        """The loss (float32 scalar).

        ``student_patch_out`` and ``teacher_probs`` are ``(M, K)``: the rows of the masked positions of
        ``masks`` (``(n_images, n_patches)`` bool) in row-major order, i.e. ``tokens[masks]``.
        """
        masks = masks.bool()
        logp = F.log_softmax(student_patch_out.float() / self.student_temp, dim=-1)
        ce = -(teacher_probs.float() * logp).sum(dim=-1)  # (M,)
        per_image = masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
        weights = (1.0 / per_image).expand_as(masks)[masks]  # 1 / masked patches of the row's image
        return (ce * weights).sum() / max(1, masks.shape[0])

    @torch.no_grad()
    def update_center(self, teacher_patch_out: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean over masked positions`` (over all processes under DDP)."""
        ema_center_(self.center, teacher_patch_out, self.center_momentum)
