"""A cell encoder without weights: hand-crafted morphology features (:mod:`leukolab.data.morphology`).

:class:`MorphologyEncoder` takes a batch of un-normalised ``[0, 1]`` images and
returns one row of :data:`~leukolab.data.morphology.FEATURE_NAMES` per image, so
it slots in wherever a frozen backbone embeds cells (the MIL task's
``--encoder morphology``). Nothing in it trains; the features are computed in
numpy on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from leukolab.data.morphology import FEATURE_NAMES, cell_morphology

__all__ = ["MORPHOLOGY", "MorphologyEncoder", "names_morphology"]

#: the name that selects this encoder
MORPHOLOGY = "morphology"


def names_morphology(source: object) -> bool:
    """``source`` (an ``--encoder`` value) selects this encoder: the name, and no file or folder of that name."""
    return str(source) == MORPHOLOGY and not Path(MORPHOLOGY).exists()


class MorphologyEncoder(nn.Module):
    """``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(B, F)`` morphology features (no parameters)."""

    feature_names: tuple[str, ...] = FEATURE_NAMES

    @property
    def num_features(self) -> int:
        """The embedding size."""
        return len(FEATURE_NAMES)

    def forward(self, x: Tensor) -> Tensor:
        images = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rows = np.stack([cell_morphology(im) for im in images]) if len(images) else np.zeros((0, self.num_features))
        return torch.from_numpy(rows.astype(np.float32)).to(x.device)
