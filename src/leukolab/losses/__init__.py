"""Loss math, one loss per file, each tested against the formula of its paper (``tests/test_losses.py``).

* :func:`~leukolab.losses.mae_loss.mae_loss` -- MAE's (normalised-)pixel MSE on masked patches.
* :class:`~leukolab.losses.dino_loss.DINOLoss` -- DINO's centred, sharpened cross-view cross-entropy.
* :func:`~leukolab.losses.koleo_loss.koleo_loss` -- DINOv2's KoLeo spreading term.
* :class:`~leukolab.losses.ibot_loss.IBOTPatchLoss` -- iBOT's masked-patch cross-entropy (DINOv2).
* :func:`~leukolab.losses.sinkhorn.sinkhorn_knopp` -- Sinkhorn–Knopp balanced teacher targets (DINOv2).

Cross-entropy for classification is :func:`torch.nn.functional.cross_entropy` itself.
"""

from leukolab.losses.dino_loss import DINOLoss
from leukolab.losses.ibot_loss import IBOTPatchLoss
from leukolab.losses.koleo_loss import koleo_loss
from leukolab.losses.mae_loss import mae_loss, patch_norm_stats
from leukolab.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "IBOTPatchLoss", "koleo_loss", "mae_loss", "patch_norm_stats", "sinkhorn_knopp"]
