"""``reconstructions.png``: what a masked auto-encoder makes of a few fixed images, epoch after epoch.

For the same preview images and the same masks every epoch, three rows per
epoch -- original, masked input, reconstruction with the visible patches pasted
back -- for the last :attr:`ReconstructionFigure.epochs` epochs, newest at the
bottom. The panels are kept in memory, so after a ``--resume`` the figure
restarts at the resumed epoch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from leukolab.data.transforms import denormalise
from leukolab.evaluation.plots import save_figure
from leukolab.losses.mae_loss import patch_norm_stats
from leukolab.models.mae import MaskedAutoencoder, patchify, unpatchify

__all__ = ["ReconstructionFigure", "reconstruct", "write_panels"]


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, imgs: torch.Tensor, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(original, masked, reconstruction)`` in [0, 1] for normalised ``imgs``; masks drawn from ``seed``.

    A model trained on normalised pixels predicts each patch's standardised
    pixels; they are mapped back with the patch's own mean and std. The visible
    patches of the reconstruction are the input's.
    """
    was_training = model.training
    model.eval()
    pred, mask = model(imgs, torch.Generator().manual_seed(seed))
    model.train(was_training)
    pred, imgs = pred.float(), imgs.float()
    if model.config.norm_pix_loss:
        mean, std = patch_norm_stats(patchify(imgs, model.patch))
        pred = pred * std + mean
    pred = unpatchify(pred, model.patch, model.grid)
    m = unpatchify(mask[..., None].expand(-1, -1, model.patch * model.patch * 3), model.patch, model.grid)
    original = denormalise(imgs)
    return original, original * (1 - m) + 0.5 * m, denormalise(imgs * (1 - m) + pred * m)


def _row(imgs: torch.Tensor, gap: int = 2) -> np.ndarray:
    """A batch in [0, 1] laid side by side as one uint8 ``(H, W, 3)`` strip."""
    arr = (imgs.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    b, h, w, c = arr.shape
    out = np.full((h + gap, b * (w + gap), c), 255, np.uint8)
    for i in range(b):
        out[:h, i * (w + gap) : i * (w + gap) + w] = arr[i]
    return out


def write_panels(panels: list[tuple[int, np.ndarray]], path: Path) -> Path:
    """One PNG: a labelled group of three rows (original / masked / reconstruction) per epoch."""
    grid = np.concatenate([p for _, p in panels], axis=0)
    h_row = panels[0][1].shape[0] / 3
    fig_w = max(4.0, grid.shape[1] / 40)
    fig, ax = plt.subplots(figsize=(fig_w + 1.6, fig_w * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ticks, labels = [], []
    for g, (epoch, _) in enumerate(panels):
        for r, name in enumerate(("original", "masked", "reconstruction")):
            ticks.append((3 * g + r + 0.5) * h_row)
            labels.append(f"epoch {epoch}: {name}" if r == 0 else name)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title("MAE reconstructions (visible patches pasted back)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, "MAE reconstructions")


class ReconstructionFigure:
    """An epoch callback of the Trainer: redraws ``run_dir/reconstructions.png`` after every epoch."""

    #: epochs shown
    epochs = 4

    def __init__(self, model: MaskedAutoencoder, images: torch.Tensor, filename: str = "reconstructions.png") -> None:
        self.model = model
        self.images = images.detach()
        self.filename = filename
        self.panels: list[tuple[int, np.ndarray]] = []

    def __call__(self, epoch: int, run_dir: Path) -> None:
        device = next(self.model.parameters()).device
        rows = reconstruct(self.model, self.images.to(device))
        self.panels = [*self.panels, (epoch, np.concatenate([_row(r) for r in rows], axis=0))][-self.epochs :]
        write_panels(self.panels, Path(run_dir) / self.filename)
