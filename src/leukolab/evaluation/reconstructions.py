"""``reconstructions.png``: what an auto-encoder (masked or convolutional) makes of a few images, epoch by epoch.

For the same preview images and the same masks every epoch, three rows per
epoch -- original, masked input, reconstruction with the visible patches pasted
back -- for the last :attr:`ReconstructionFigure.epochs` epochs, newest at the
bottom; for a :class:`~leukolab.models.autoencoder.ConvAutoencoder` two rows,
original and reconstruction. The panels are kept in memory, so after a
``--resume`` the figure restarts at the resumed epoch.
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
from leukolab.models.autoencoder import ConvAutoencoder
from leukolab.models.mae import MaskedAutoencoder, patchify, unpatchify

__all__ = ["ReconstructionFigure", "reconstruct", "reconstruct_autoencoder", "write_panels"]

MAE_ROWS = ("original", "masked", "reconstruction")
AE_ROWS = ("original", "reconstruction")
MAE_TITLE = "MAE reconstructions (visible patches pasted back)"
AE_TITLE = "Auto-encoder reconstructions"


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


@torch.no_grad()
def reconstruct_autoencoder(model: ConvAutoencoder, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original, reconstruction)`` in [0, 1] of normalised ``imgs`` (the model in eval mode for the call)."""
    was_training = model.training
    model.eval()
    pred = model(imgs)
    model.train(was_training)
    return denormalise(imgs.float()), denormalise(pred.float())


def _row(imgs: torch.Tensor, gap: int = 2) -> np.ndarray:
    """A batch in [0, 1] laid side by side as one uint8 ``(H, W, 3)`` strip."""
    arr = (imgs.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    b, h, w, c = arr.shape
    out = np.full((h + gap, b * (w + gap), c), 255, np.uint8)
    for i in range(b):
        out[:h, i * (w + gap) : i * (w + gap) + w] = arr[i]
    return out


def write_panels(panels: list[tuple[int, np.ndarray]], path: Path, row_names: tuple[str, ...] = MAE_ROWS,
                 title: str = MAE_TITLE) -> Path:
    """One PNG: a labelled group of rows (by default original / masked / reconstruction) per epoch."""
    grid = np.concatenate([p for _, p in panels], axis=0)
    n_rows = len(row_names)
    h_row = panels[0][1].shape[0] / n_rows
    fig_w = max(4.0, grid.shape[1] / 40)
    fig, ax = plt.subplots(figsize=(fig_w + 1.6, fig_w * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ticks, labels = [], []
    for g, (epoch, _) in enumerate(panels):
        for r, name in enumerate(row_names):
            ticks.append((n_rows * g + r + 0.5) * h_row)
            labels.append(f"epoch {epoch}: {name}" if r == 0 else name)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, title.split(" (")[0])


class ReconstructionFigure:
    """An epoch callback of the Trainer: redraws ``run_dir/reconstructions.png`` after every epoch."""

    #: epochs shown
    epochs = 4

    def __init__(self, model: MaskedAutoencoder | ConvAutoencoder, images: torch.Tensor,
                 filename: str = "reconstructions.png") -> None:
        self.model = model
        self.images = images.detach()
        self.filename = filename
        self.panels: list[tuple[int, np.ndarray]] = []

    def __call__(self, epoch: int, run_dir: Path) -> None:
        device = next(self.model.parameters()).device
        images = self.images.to(device)
        if isinstance(self.model, ConvAutoencoder):
            rows, names, title = reconstruct_autoencoder(self.model, images), AE_ROWS, AE_TITLE
        else:
            rows, names, title = reconstruct(self.model, images), MAE_ROWS, MAE_TITLE
        self.panels = [*self.panels, (epoch, np.concatenate([_row(r) for r in rows], axis=0))][-self.epochs :]
        write_panels(self.panels, Path(run_dir) / self.filename, names, title)
