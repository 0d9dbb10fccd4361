"""The masked auto-encoder loss (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Mean squared error per patch, averaged over the *masked* patches only; with
``norm_pix`` the target is each patch's pixels standardised by the patch's own
mean and (unbiased) variance, ``(t - mean) / sqrt(var + 1e-6)`` -- the
"normalized pixels" variant of the paper (``forward_loss`` of
facebookresearch/mae ``models_mae.py``). ``visible_weight`` > 0 adds the same
error on the visible patches (a leukolab option, off by default). Written here
because neither torch nor timm ships it.
"""

from __future__ import annotations

import torch

#: added to the per-patch variance before the square root, as in facebookresearch/mae
PATCH_NORM_EPS = 1e-6


def patch_norm_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` over the last dimension of ``patches`` (B, N, P), as the normalised-pixel target uses them."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + PATCH_NORM_EPS) ** 0.5


def mae_loss(
    pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, visible_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, logs)`` of pixel predictions ``pred`` (B, N, P) for the image ``patches`` (B, N, P).

    ``mask`` (B, N) is 1 on the masked patches, 0 on the visible ones. The loss is
    computed in float32 whatever the dtype of ``pred``. ``logs`` holds the masked
    and visible errors when ``visible_weight`` > 0, else nothing.
    """
    target = patches.float()
    if norm_pix:
        mean, std = patch_norm_stats(target)
        target = (target - mean) / std
    err = ((pred.float() - target) ** 2).mean(dim=-1)
    loss = (err * mask).sum() / mask.sum()
    if visible_weight <= 0:
        return loss, {}
    visible = (err * (1 - mask)).sum() / (1 - mask).sum()
    logs = {"visible_mse": float(visible.detach()), "masked_mse": float(loss.detach())}
    return loss + visible_weight * visible, logs
