"""A convolutional auto-encoder whose encoder is an unmodified headless timm CNN (seed 001's pathology AE).

The encoder is built by :func:`leukolab.models.backbones.create_backbone` (so its
weights export in timm naming and load into ``leukolab train --init``); its
``forward_features`` map (``(B, C, H / r, W / r)``, ``r`` the network's total
stride, 32 for a ResNet) goes through a 1x1 projection to ``decoder_dim``
channels and ``ceil(log2(r))`` upsampling blocks (nearest x2 upsampling, 3x3
convolution, batch norm, ReLU; the width halves each block down to
``min_width``), then a 3x3 convolution to RGB, resized to the input size when
the stride does not divide it. There are no skip connections: everything the
decoder draws has passed through the encoder's bottleneck, which is what makes
the encoder learn.

timm's ``features_only`` wrappers are not used: they rename or drop modules,
and the encoder must keep the classifier backbone's state-dict layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.backbones import is_vit

AE_LOSSES = ("mse", "l1", "l1+mse")


@dataclass
class AEConfig:
    """The ``ae:`` section of a pretrain config; every option is checked here, once."""

    decoder_dim: int = 256  # channels of the first decoder block (halved per block)
    min_width: int = 16  # narrowest decoder block
    loss: str = "mse"  # mse | l1 | l1+mse, on normalised pixels

    def __post_init__(self) -> None:
        for name in ("decoder_dim", "min_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeukolabError(f"ae.{name} {value!r} must be an integer >= 1")
        if self.loss not in AE_LOSSES:
            raise LeukolabError(f"ae.loss {self.loss!r} is unknown; expected one of: {', '.join(AE_LOSSES)}")


def require_cnn(model: nn.Module, name: str, method: str = "--method ae") -> nn.Module:
    """``model`` if it is a convolutional timm backbone with ``forward_features``, else a one-line error."""
    if is_vit(model):
        raise LeukolabError(f"{method}: backbone {name} is a Vision Transformer; expected a CNN backbone such as "
                            "resnet18")
    if not callable(getattr(model, "forward_features", None)):
        raise LeukolabError(f"{method}: backbone {name} has no forward_features; expected a timm CNN backbone such "
                            "as resnet18")
    return model


@torch.no_grad()
def feature_shape(encoder: nn.Module, img_size: int, name: str) -> tuple[int, int]:
    """``(channels, stride)`` of ``encoder.forward_features`` at ``img_size`` (one probe forward in eval mode)."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder.forward_features(torch.zeros(1, 3, img_size, img_size))
    finally:
        encoder.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise LeukolabError(f"--method ae: backbone {name} does not give a (B, C, H, W) feature map; expected a CNN "
                            "backbone such as resnet18")
    return int(out.shape[1]), max(1, round(img_size / int(out.shape[-1])))


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ConvDecoder(nn.Module):
    """Feature map ``(B, in_channels, h, w)`` -> image ``(B, 3, h * 2**blocks, w * 2**blocks)``."""

    def __init__(self, in_channels: int, blocks: int, width: int, min_width: int = 16) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, c = [], width
        for _ in range(blocks):
            nxt = max(min_width, c // 2)
            layers.append(_up_block(c, nxt))
            c = nxt
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.proj(feats)))


class ConvAutoencoder(nn.Module):
    """A timm CNN ``encoder`` and a :class:`ConvDecoder`; :meth:`forward` reconstructs the (normalised) input."""

    def __init__(self, encoder: nn.Module, img_size: int, config: AEConfig, name: str = "backbone") -> None:
        super().__init__()
        self.encoder = require_cnn(encoder, name)
        self.config = config
        self.img_size = int(img_size)
        channels, stride = feature_shape(encoder, self.img_size, name)
        self.stride = stride
        self.decoder = ConvDecoder(channels, max(0, math.ceil(math.log2(stride))), config.decoder_dim,
                                   config.min_width)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``(B, 3, H, W)`` of a batch of normalised images."""
        out = self.decoder(self.encoder.forward_features(imgs))
        if out.shape[-2:] != imgs.shape[-2:]:
            out = F.interpolate(out, size=imgs.shape[-2:], mode="bilinear", align_corners=False)
        return out
