"""Loss math, one loss per file, each tested against the formula of its paper (``tests/test_losses.py``).

* :func:`~leukolab.losses.mae_loss.mae_loss` -- MAE's (normalised-)pixel MSE on masked patches.
* :class:`~leukolab.losses.dino_loss.DINOLoss` -- DINO's centred, sharpened cross-view cross-entropy.
* :func:`~leukolab.losses.koleo_loss.koleo_loss` -- DINOv2's KoLeo spreading term.

Cross-entropy for classification is :func:`torch.nn.functional.cross_entropy` itself.
"""

from leukolab.losses.dino_loss import DINOLoss
from leukolab.losses.koleo_loss import koleo_loss
from leukolab.losses.mae_loss import mae_loss, patch_norm_stats

__all__ = ["DINOLoss", "koleo_loss", "mae_loss", "patch_norm_stats"]
