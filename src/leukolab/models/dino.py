"""DINO's networks (Caron et al. 2021): projection head, multi-crop wrapper, and the ``dino:`` config.

Student and teacher are each a timm backbone followed by a :class:`DINOHead`
(3-layer MLP -> L2-normalised bottleneck -> cosine similarity with unit-norm
prototypes, i.e. weight norm with the gain fixed to 1), wrapped by
:class:`MultiCropNet`, which runs the backbone once per crop resolution.
A ViT backbone is built with timm's ``dynamic_img_size`` (which leaves its
weights unchanged) so that local crops can be smaller than global ones.
The loss is :class:`leukolab.losses.dino_loss.DINOLoss`; the teacher's EMA
update is :func:`leukolab.models.ema.ema_update_`.

For iBOT (DINOv2's masked-patch loss) :func:`vit_tokens` runs a timm ViT with
some patch embeddings replaced by a learnable mask token (timm itself has no
such input), :func:`random_patch_masks` draws the masks and
:meth:`MultiCropNet.forward_ibot` returns the patch head's outputs at the masked
positions alongside the usual CLS outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone, is_vit


@dataclass
class DINOConfig:
    """The ``dino:`` section of a pretrain config (head, loss, teacher schedules and multi-crop views)."""

    out_dim: int = 1024  # prototypes
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    head_batch_norm: bool = False  # BatchNorm after the head's hidden layers (teacher: batch statistics too)
    local_crops: int = 4
    local_size: int = 32
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter: float = 1.0  # colour-jitter strength (0 = none)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_ratio: float = 0.3  # share of the steps warming the teacher temperature up
    momentum: float = 0.996  # teacher EMA, cosine-scheduled to 1
    center_momentum: float = 0.9
    koleo_weight: float = 0.0  # DINOv2 uses 0.1
    freeze_last_layer_ratio: float = 0.0  # share of the steps with frozen prototypes
    n_global: int = 2  # global crops (the teacher's views)
    batched_crops: bool = False  # multi-crop per batch on tensors (data.multicrop.BatchedMultiCrop), not per image
    centering: str = "center"  # center (running centre + softmax, DINO) | sinkhorn (Sinkhorn-Knopp, DINOv2)
    sinkhorn_iterations: int = 3
    ibot_weight: float = 0.0  # iBOT masked-patch loss weight (0 = off; DINOv2 uses 1.0); ViT backbones only
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # per masked image, share of patches masked, drawn uniformly
    ibot_mask_probability: float = 0.5  # share of the global crops that get a mask
    ibot_separate_head: bool = False  # own head for patch tokens (default: the DINO head is shared)

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise LeukolabError(f"teacher momentum {self.momentum} is outside [0, 1]; expected e.g. 0.996")
        if self.centering not in ("center", "sinkhorn"):  # losses.dino_loss.CENTERINGS
            raise LeukolabError(f"dino.centering {self.centering!r} is not one of center, sinkhorn")
        if int(self.sinkhorn_iterations) < 1:
            raise LeukolabError(f"dino.sinkhorn_iterations {self.sinkhorn_iterations} must be >= 1")
        if not float(self.ibot_weight) >= 0.0:
            raise LeukolabError(f"dino.ibot_weight {self.ibot_weight} must be >= 0 (0 = no iBOT loss)")
        ratio = self.ibot_mask_ratio
        if (not isinstance(ratio, (list, tuple)) or len(ratio) != 2
                or not 0.0 <= float(ratio[0]) <= float(ratio[1]) <= 1.0):
            raise LeukolabError(f"dino.ibot_mask_ratio {ratio!r} must be [min, max] with 0 <= min <= max <= 1")
        self.ibot_mask_ratio = (float(ratio[0]), float(ratio[1]))
        if not 0.0 <= float(self.ibot_mask_probability) <= 1.0:
            raise LeukolabError(f"dino.ibot_mask_probability {self.ibot_mask_probability} is outside [0, 1]")


class TokenBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the last dimension of ``(..., C)`` inputs (CLS features or flattened patch tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity with ``out_dim`` unit-norm prototypes.

    ``batch_norm`` puts a BatchNorm after each hidden layer (as lightly's and solo-learn's DINO heads can):
    it removes the batch's common component from the hidden features, which on small, homogeneous image
    sets keeps the centred teacher targets from going uniform (see the README's DINO notes).
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 batch_norm: bool = False) -> None:
        super().__init__()
        norm = (lambda: TokenBatchNorm(hidden_dim)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), norm(), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        w = self.prototypes.detach() if freeze_prototypes else self.prototypes
        return F.linear(z, F.normalize(w, dim=-1, eps=1e-6))


class MultiCropNet(nn.Module):
    """Backbone + DINO head, run once per crop resolution (DINO's ``MultiCropWrapper``).

    With ``ibot`` (a ViT backbone) it also holds the learnable ``mask_token`` and,
    when ``patch_head`` is given, a separate head for patch tokens (else the DINO
    head is shared, DINOv2's default).
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, ibot: bool = False,
                 patch_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.mask_token: nn.Parameter | None = None
        if ibot:
            if not is_vit(backbone):
                raise LeukolabError("iBOT needs a Vision Transformer backbone (patch tokens)")
            self.mask_token = nn.Parameter(torch.zeros(1, 1, int(backbone.embed_dim)))

    def _pooled(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of all crops, one backbone call per run of equally sized crops."""
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end]) if end - start > 1 else crops[start]))
            start = end
        return torch.cat(feats) if len(feats) > 1 else feats[0]

    def forward(self, crops: list[torch.Tensor], freeze_prototypes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features, head outputs)`` of all crops, concatenated in crop order."""
        f = self._pooled(crops)
        return f, self.head(f, freeze_prototypes)

    def forward_ibot(self, crops: list[torch.Tensor], n_global: int, masks: torch.Tensor, mask_input: bool,
                     freeze_prototypes: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled features, head outputs, patch-head outputs at the masked positions)``.

        The first ``n_global`` crops (one size) run as one batch of ``n_global * B`` images; ``masks``
        (``(n_global * B, n_patches)`` bool) marks the patches the patch head scores (row-major, i.e.
        ``tokens[masks]``). ``mask_input`` replaces those patches by the mask token first (the
        student); without it the crops are seen whole (the teacher). Later crops take the usual path.
        """
        if self.mask_token is None:
            raise LeukolabError("this network was built without iBOT (no mask token)")
        tokens = vit_tokens(self.backbone, torch.cat(crops[:n_global]), masks if mask_input else None,
                            self.mask_token)
        feats = self.backbone.forward_head(tokens)
        if len(crops) > n_global:
            feats = torch.cat([feats, self._pooled(crops[n_global:])])
        patches = tokens[:, self.backbone.num_prefix_tokens:][masks]
        patch_head = self.patch_head if self.patch_head is not None else self.head
        return feats, self.head(feats, freeze_prototypes), patch_head(patches, freeze_prototypes)


def vit_tokens(vit: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ViT's ``forward_features`` (all tokens after the final norm) with masked patches.

    Where ``mask`` (``(B, n_patches)`` bool, row-major over the patch grid) is True
    the patch embedding is replaced by ``mask_token`` (``(1, 1, D)``) before the
    position embedding, as in iBOT / DINOv2. Prefix tokens (CLS, registers) come first
    (``vit.num_prefix_tokens``). ``dynamic_img_size`` ViTs embed to ``(B, H, W, D)``;
    both layouts are handled. Without a mask it equals ``vit.forward_features(x)``.
    """
    x = vit.patch_embed(x)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask token")
        if mask.numel() != x[..., 0].numel():
            raise ValueError(f"mask of {tuple(mask.shape)} for {tuple(x.shape[:-1])} patch tokens")
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(m, mask_token.to(x.dtype).reshape(*([1] * (x.ndim - 1)), -1), x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def num_patches(vit: nn.Module, height: int, width: int) -> int:
    """Patch tokens a ViT makes of a ``height`` x ``width`` crop."""
    pe = vit.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size((height, width))
    else:
        gh, gw = height // pe.patch_size[0], width // pe.patch_size[1]
    return int(gh) * int(gw)


def random_patch_masks(n_images: int, n_patches: int, ratio: tuple[float, float], probability: float,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """iBOT masks ``(n_images, n_patches)`` bool: random (not block-wise) patches.

    ``round(probability * n_images)`` images, chosen at random, each get
    ``round(r * n_patches)`` masked patches (at least one) with ``r`` drawn
    uniformly in ``ratio``; the other images are left whole (DINOv2 masks
    ``int(probability * n)`` images of the batch, with block-wise masks).
    """
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool, device=device)
    n_masked = round(float(probability) * n_images)
    if n_masked == 0 or n_patches == 0:
        return masks
    chosen = torch.randperm(n_images, device=device)[:n_masked]
    lo, hi = ratio
    r = lo + (hi - lo) * torch.rand(n_masked, device=device)
    counts = (r * n_patches).round().clamp(1, n_patches)
    ranks = torch.rand(n_masked, n_patches, device=device).argsort(dim=1).argsort(dim=1)
    masks[chosen] = ranks < counts[:, None]
    return masks


def dino_backbone(name: str, img_size: int, drop_path: float, kwargs: dict[str, Any]) -> nn.Module:
    """A backbone for multi-crop input: a ViT takes any crop size (``dynamic_img_size``) with the same weights."""
    model = create_backbone(name, img_size, drop_path, **kwargs)
    if is_vit(model) and not getattr(model, "dynamic_img_size", False):
        try:
            model = create_backbone(name, img_size, drop_path, dynamic_img_size=True, **kwargs)
        except LeukolabError:
            pass
    return model
