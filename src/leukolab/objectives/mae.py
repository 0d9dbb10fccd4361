"""Masked auto-encoder (MAE, He et al. 2022) pretraining of a timm Vision Transformer.

The encoder is an unmodified headless timm ``VisionTransformer`` (so its
weights export in timm naming); it runs only on the visible patches plus its
prefix tokens (class token and register tokens, ``model.num_prefix_tokens``).
Each sample keeps exactly ``round(N * (1 - mask_ratio))`` of its ``N`` patches,
chosen by an argsort of uniform noise (clamped to ``[1, N - 1]`` so that both
sets are non-empty). A light decoder (``decoder_depth`` timm blocks of width
``decoder_dim``) sees the encoded visible tokens and a shared mask token at the
masked positions, each with a fixed 2-D sin-cos position embedding, and predicts
the pixels of every patch. The loss is the mean squared error on the masked
patches, of per-patch normalised pixels when ``norm_pix_loss`` is on;
``visible_loss_weight`` > 0 adds the error on the visible patches too.

``reconstructions.png`` (written after every epoch when preview images are set)
shows, for the same 8 validation images and the same masks every epoch, three
rows per epoch -- original, masked input, reconstruction with the visible
patches pasted back -- for the last :attr:`MAEObjective.preview_epochs` epochs,
newest at the bottom. The panels are kept in memory, so after a ``--resume``
the figure restarts at the resumed epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from leukolab.data.transforms import MEAN, STD
from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone
from leukolab.objectives.base import Objective, StepOutput
from leukolab.registry import OBJECTIVES


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``(grid_h * grid_w, dim)`` (MAE / MoCo-v3 layout)."""
    if dim % 4:
        raise LeukolabError(f"embedding width {dim} must be a multiple of 4 for a 2-D sin-cos position embedding")
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(xs), one(ys)], dim=1).float()


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch * patch * C)``, patches in row-major grid order."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * patch, gw * patch)


def require_vit(model: nn.Module, name: str, method: str) -> VisionTransformer:
    """``model`` if it is a timm ``VisionTransformer``, else a one-line error."""
    if not isinstance(model, VisionTransformer):
        raise LeukolabError(
            f"{method} needs a timm Vision Transformer backbone (e.g. vit_tiny_patch16); {name} is a "
            f"{type(model).__name__}"
        )
    return model


@OBJECTIVES.register("mae")
class MAEObjective(Objective):
    """Masked auto-encoding of images normalised by :mod:`leukolab.data.transforms`."""

    monitor = "val_loss"
    monitor_mode = "min"
    #: epochs shown in ``reconstructions.png``
    preview_epochs = 4

    def __init__(
        self,
        backbone: str,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        visible_loss_weight: float = 0.0,
        fixed_pos_embed: bool = True,
        drop_path: float = 0.0,
        extras: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < float(mask_ratio) < 1.0:
            raise LeukolabError(f"mask ratio {mask_ratio} is outside (0, 1); expected e.g. 0.75")
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.encoder = require_vit(create_backbone(backbone, img_size, drop_path, **self.backbone_kwargs),
                                   backbone, "MAE")
        vit = self.encoder
        if getattr(vit, "dynamic_img_size", False):
            raise LeukolabError("MAE needs a fixed image size; drop dynamic_img_size from the backbone options")
        self.backbone_name = backbone
        self.img_size = int(img_size)
        self.mask_ratio = float(mask_ratio)
        self.patch = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_keep = num_kept(self.num_patches, self.mask_ratio)
        self.num_prefix = int(vit.num_prefix_tokens)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.visible_loss_weight = float(visible_loss_weight)
        self.extras = extras or {}
        embed_dim = int(vit.embed_dim)
        if vit.pos_embed is not None and fixed_pos_embed:
            with torch.no_grad():
                offset = 0 if vit.no_embed_class else self.num_prefix
                vit.pos_embed[:, offset:] = sincos_2d(embed_dim, *self.grid)
                vit.pos_embed[:, :offset] = 0
            vit.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, *self.grid)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        for mod in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mod.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("preview", torch.empty(0), persistent=False)
        self._panels: list[tuple[int, np.ndarray]] = []

    # ------------------------------------------------------------------ masking
    def random_masking(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids_keep (B, K), ids_restore (B, N), mask (B, N) with 1 = masked)`` for a batch."""
        n, keep = self.num_patches, self.num_keep
        if generator is None:
            noise = torch.rand(batch_size, n, device=device)
        else:
            noise = torch.rand(batch_size, n, generator=generator).to(device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(batch_size, n, device=device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

    # ------------------------------------------------------------------ networks
    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(B, prefix + K, D)`` for the visible patches ``ids_keep``."""
        vit = self.encoder
        tokens = vit._pos_embed(vit.patch_embed(imgs))  # prefix tokens + all patches, position-embedded
        prefix, patches = tokens[:, : self.num_prefix], tokens[:, self.num_prefix :]
        patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        x = vit.norm_pre(torch.cat([prefix, patches], dim=1))
        return vit.norm(vit.blocks(x))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Pixel predictions ``(B, N, patch * patch * 3)`` for every patch."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, k, d = visible.shape
        full = torch.cat([visible, self.mask_token.to(x.dtype).expand(b, self.num_patches - k, d)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, d)) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, full], dim=1)))
        return self.decoder_pred(x[:, self.num_prefix :])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The per-patch regression target (normalised per patch when ``norm_pix_loss``)."""
        t = patchify(imgs.float(), self.patch)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def forward(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(loss, prediction (B, N, P), mask (B, N), logs)`` of a batch."""
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], imgs.device, generator)
        pred = self.decode(self.encode(imgs, ids_keep), ids_restore)
        err = ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)
        loss = (err * mask).sum() / mask.sum()
        logs: dict[str, float] = {}
        if self.visible_loss_weight > 0:
            visible = (err * (1 - mask)).sum() / (1 - mask).sum()
            logs["visible_mse"] = float(visible.detach())
            logs["masked_mse"] = float(loss.detach())
            loss = loss + self.visible_loss_weight * visible
        return loss, pred, mask, logs

    # ------------------------------------------------------------------ Objective
    def training_step(self, batch: Any) -> StepOutput:
        imgs = batch[0] if isinstance(batch, (list, tuple)) else batch
        loss, _, _, logs = self(imgs)
        return StepOutput(loss, logs, batch_size=int(imgs.shape[0]))

    @torch.no_grad()
    def validate(self, loader: Any, device: torch.device) -> dict[str, float]:
        """Masked-patch loss over ``loader`` with the same masks every epoch."""
        self.eval()
        g = torch.Generator().manual_seed(0)
        total, count = 0.0, 0
        for batch in loader:
            imgs = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
            loss, _, _, _ = self(imgs, g)
            total += float(loss) * imgs.shape[0]
            count += imgs.shape[0]
        return {"val_loss": total / max(1, count)}

    def set_preview(self, imgs: torch.Tensor) -> None:
        """The (normalised) images shown in ``reconstructions.png``."""
        self.preview = imgs.detach().to(self.decoder_pred.weight.device)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(original, masked, reconstruction)`` in [0, 1], visible patches pasted into the reconstruction."""
        was_training = self.training
        self.eval()
        _, pred, mask, _ = self(imgs, torch.Generator().manual_seed(seed))
        self.train(was_training)
        pred = pred.float()
        if self.norm_pix_loss:
            t = patchify(imgs.float(), self.patch)
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        pred = unpatchify(pred, self.patch, self.grid)
        m = unpatchify(mask[..., None].expand(-1, -1, self.patch * self.patch * 3), self.patch, self.grid)
        imgs = imgs.float()
        mean = torch.tensor(MEAN, device=imgs.device).view(1, -1, 1, 1)
        std = torch.tensor(STD, device=imgs.device).view(1, -1, 1, 1)
        original = (imgs * std + mean).clamp(0, 1)
        recon = ((imgs * (1 - m) + pred * m) * std + mean).clamp(0, 1)
        masked = original * (1 - m) + 0.5 * m
        return original, masked, recon

    def on_epoch_end(self, epoch: int, run_dir: Path, device: torch.device) -> None:
        if self.preview.numel() == 0:
            return
        rows = self.reconstruct(self.preview)
        panel = np.concatenate([_row(r) for r in rows], axis=0)
        self._panels = [*self._panels, (epoch, panel)][-self.preview_epochs :]
        write_panels(self._panels, Path(run_dir) / "reconstructions.png")

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {
            "backbone_name": self.backbone_name, "img_size": self.img_size,
            "backbone_kwargs": dict(self.backbone_kwargs), "registers": int(self.backbone_kwargs.get("reg_tokens", 0)),
            "task": "pretrain-mae", **self.extras,
        }


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps visible: ``round(N * (1 - mask_ratio))`` clamped to ``[1, N - 1]``."""
    return min(num_patches - 1, max(1, round(num_patches * (1 - mask_ratio))))

