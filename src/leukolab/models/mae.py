"""The masked auto-encoder (He et al. 2022) around a timm Vision Transformer, in one module.

Shaped like ``models_mae.py`` of facebookresearch/mae: :func:`patchify`,
:meth:`MaskedAutoencoder.random_masking`, ``forward_encoder``,
``forward_decoder``; the loss is :func:`leukolab.losses.mae_loss.mae_loss`.

The encoder is an unmodified headless timm ``VisionTransformer`` (so its weights
export in timm naming); it runs only on the visible patches plus its prefix
tokens (class token and register tokens, ``num_prefix_tokens``). Each sample
keeps exactly ``round(N * (1 - mask_ratio))`` of its ``N`` patches (clamped to
``[1, N - 1]``), chosen by an argsort of uniform noise. A light decoder
(``decoder_depth`` timm blocks of width ``decoder_dim``) sees the encoded
visible tokens and a shared mask token at the masked positions, each with a
fixed 2-D sin-cos position embedding, and predicts the pixels of every patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from leukolab.errors import LeukolabError


@dataclass
class MAEConfig:
    """The ``mae:`` section of a pretrain config; every option is checked here, once."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (the paper's better variant)
    visible_loss_weight: float = 0.0  # > 0 also regresses the visible patches
    fixed_pos_embed: bool = True  # frozen 2-D sin-cos encoder position embedding, as in MAE

    def __post_init__(self) -> None:
        self.mask_ratio = float(self.mask_ratio)
        if not 0.0 < self.mask_ratio < 1.0:
            raise LeukolabError(f"mask ratio {self.mask_ratio} is outside (0, 1); expected e.g. 0.75")
        if self.visible_loss_weight < 0:
            raise LeukolabError(f"visible loss weight {self.visible_loss_weight} must be >= 0")


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


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps visible: ``round(N * (1 - mask_ratio))`` clamped to ``[1, N - 1]``."""
    return min(num_patches - 1, max(1, round(num_patches * (1 - mask_ratio))))


def require_vit(model: nn.Module, name: str, method: str) -> VisionTransformer:
    """``model`` if it is a timm ``VisionTransformer``, else a one-line error."""
    if not isinstance(model, VisionTransformer):
        raise LeukolabError(
            f"{method} needs a timm Vision Transformer backbone (e.g. vit_tiny_patch16); {name} is a "
            f"{type(model).__name__}"
        )
    return model


class MaskedAutoencoder(nn.Module):
    """A timm ViT ``encoder`` plus MAE's decoder; :meth:`forward` returns pixel predictions and the mask."""

    def __init__(self, encoder: VisionTransformer, config: MAEConfig) -> None:
        super().__init__()
        if getattr(encoder, "dynamic_img_size", False):
            raise LeukolabError("MAE needs a fixed image size; drop dynamic_img_size from the backbone options")
        self.encoder = encoder
        self.config = config
        self.patch = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_keep = num_kept(self.num_patches, config.mask_ratio)
        self.num_prefix = int(encoder.num_prefix_tokens)
        embed_dim, dim = int(encoder.embed_dim), int(config.decoder_dim)
        if encoder.pos_embed is not None and config.fixed_pos_embed:
            with torch.no_grad():
                offset = 0 if encoder.no_embed_class else self.num_prefix
                encoder.pos_embed[:, offset:] = sincos_2d(embed_dim, *self.grid)
                encoder.pos_embed[:, :offset] = 0
            encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dim, *self.grid)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(config.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch * self.patch * 3)
        for mod in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mod.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids_keep (B, K), ids_restore (B, N), mask (B, N), 1 = masked)``; a (CPU) ``generator`` fixes the masks."""
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

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(B, prefix + K, D)`` for the visible patches ``ids_keep``."""
        vit = self.encoder
        tokens = vit._pos_embed(vit.patch_embed(imgs))  # prefix tokens + all patches, position-embedded
        prefix, patches = tokens[:, : self.num_prefix], tokens[:, self.num_prefix :]
        patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        x = vit.norm_pre(torch.cat([prefix, patches], dim=1))
        return vit.norm(vit.blocks(x))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Pixel predictions ``(B, N, patch * patch * 3)`` for every patch."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, k, d = visible.shape
        full = torch.cat([visible, self.mask_token.to(x.dtype).expand(b, self.num_patches - k, d)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, d)) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, full], dim=1)))
        return self.decoder_pred(x[:, self.num_prefix :])

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction (B, N, P), mask (B, N))`` of a batch of normalised images."""
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], imgs.device, generator)
        return self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_restore), mask


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
