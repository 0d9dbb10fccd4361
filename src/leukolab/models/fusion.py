"""Frozen multi-encoder fusion: several pretrained encoders side by side, their pooled features concatenated.

Seed 001's WBC head sits on several *frozen* encoders; here that is :class:`FusionBackbone`, a backbone
like any other (it has ``num_features``), so :class:`~leukolab.models.classifier.Classifier` puts a
head from :data:`~leukolab.registry.HEADS` on it and the one Trainer trains that head.

Every encoder sees the image the way it was trained to: the fusion model takes one shared input
(``img_size`` px, normalised with ``mean``/``std``, i.e. leukolab's
:func:`~leukolab.data.transforms.eval_transform`) and, per encoder, resizes it to the encoder's own
input size (bilinear, antialiased) and renormalises it to the encoder's own mean and std. Resizing is
linear with weights summing to one, so it commutes with the per-channel affine renormalisation.

Each encoder is described by an :class:`EncoderRecord` (plain data, kept in the run's config and
checkpoint), so a saved fusion run is rebuilt without the files its encoders came from: the weights
themselves are in the checkpoint. Registered as the backbone ``fusion`` in
:data:`~leukolab.models.backbones.BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leukolab.checkpoints import LEUKOLAB_MEAN, LEUKOLAB_STD
from leukolab.errors import LeukolabError
from leukolab.models.backbones import BACKBONES, create_backbone

__all__ = ["FEATURE_NORMS", "EncoderRecord", "FusedEncoder", "FusionBackbone", "build_encoder", "fusion_backbone"]

#: per-encoder feature normalisation before concatenation (no learnable parameters)
FEATURE_NORMS = ("none", "l2", "layernorm")


@dataclass
class EncoderRecord:
    """How to rebuild one frozen encoder and feed it (YAML- and checkpoint-safe plain data).

    Attributes:
        source: the file or run folder its weights came from (for the record; not read again).
        kind: the checkpoint's task (``classification``, ``pretrain-mae``, ``converted``, ``raw`` ...).
        name: timm model name (``builder == "timm"``), or a label for messages.
        builder: ``timm`` (``create_backbone(name, img_size, **kwargs)``) or ``vit_config``
            (:func:`leukolab.zoo.vit_from_config` of ``kwargs``, for raw ViT files).
        kwargs: the builder's keyword arguments.
        img_size: the encoder's own input size.
        mean: its input normalisation mean per channel.
        std: its input normalisation std per channel.
        num_features: the width of its pooled features.
        notes: what the fusion does to its input (resize, renormalisation) and other remarks.
    """

    source: str
    kind: str
    name: str
    builder: str
    kwargs: dict[str, Any]
    img_size: int
    mean: list[float]
    std: list[float]
    num_features: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a config or checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderRecord:
        """Inverse of :meth:`to_dict`; a malformed record is a one-line error."""
        try:
            return cls(source=str(d["source"]), kind=str(d["kind"]), name=str(d["name"]),
                       builder=str(d.get("builder", "timm")), kwargs=dict(d.get("kwargs") or {}),
                       img_size=int(d["img_size"]), mean=[float(v) for v in d["mean"]],
                       std=[float(v) for v in d["std"]], num_features=int(d["num_features"]),
                       notes=[str(n) for n in d.get("notes") or []])
        except (KeyError, TypeError, ValueError) as exc:
            raise LeukolabError(f"fusion encoder record {dict(d)!r} is malformed ({exc}); expected the record "
                                "written by leukolab train --fuse") from None


def build_encoder(record: EncoderRecord) -> nn.Module:
    """The encoder ``record`` describes, with random weights (the caller loads them)."""
    if record.builder == "timm":
        return create_backbone(record.name, record.img_size, **record.kwargs)
    if record.builder == "vit_config":
        from leukolab.zoo import vit_from_config

        return vit_from_config(record.kwargs, img_size=record.img_size)
    raise LeukolabError(f"fusion encoder {record.source}: unknown builder {record.builder!r}; "
                        "expected timm or vit_config")


class FusedEncoder(nn.Module):
    """One frozen encoder with its own input preparation and feature normalisation.

    ``forward`` takes the shared input (``in_size`` px, normalised with ``in_mean``/``in_std``) and
    returns the encoder's pooled features, normalised per ``norm``.
    """

    def __init__(self, encoder: nn.Module, record: EncoderRecord, in_size: int, in_mean: Sequence[float],
                 in_std: Sequence[float], norm: str = "layernorm") -> None:
        super().__init__()
        if norm not in FEATURE_NORMS:
            raise LeukolabError(f"fusion feature norm {norm!r} is unknown; expected one of {', '.join(FEATURE_NORMS)}")
        self.encoder = encoder.requires_grad_(False).eval()
        self.record = record
        self.in_size = int(in_size)
        self.norm = norm
        # x_own = (x_shared * in_std + in_mean - mean) / std = x_shared * scale + shift
        in_mean_t, in_std_t = torch.tensor(in_mean), torch.tensor(in_std)
        mean_t, std_t = torch.tensor(record.mean), torch.tensor(record.std)
        self.register_buffer("scale", (in_std_t / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean_t - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)
        self.renormalise = not (torch.allclose(in_mean_t, mean_t) and torch.allclose(in_std_t, std_t))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The shared input as this encoder expects it: its size, its normalisation."""
        size = self.record.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.renormalise:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(self.prepare(x))
        if f.ndim != 2:
            raise LeukolabError(f"fusion encoder {self.record.source} gives features of shape {tuple(f.shape)}; "
                                "expected pooled (N, C) features")
        if self.norm == "l2":
            return F.normalize(f, dim=1)
        if self.norm == "layernorm":
            return F.layer_norm(f, f.shape[1:])
        return f


class FusionBackbone(nn.Module):
    """Frozen encoders whose (per-encoder normalised) pooled features are concatenated.

    The encoders never train: their parameters have ``requires_grad=False`` and they stay in eval
    mode whatever :meth:`train` is asked (batch-norm statistics and dropout frozen too).

    Features computed once by :meth:`forward` can be fed back instead of images (a 2-D
    ``(N, num_features)`` tensor passes through unchanged): the cached-feature path of
    :mod:`leukolab.pipelines.fusion`, which trains the head on exactly what the images would give.
    """

    def __init__(self, encoders: Sequence[nn.Module], records: Sequence[EncoderRecord], img_size: int,
                 norm: str = "layernorm", mean: Sequence[float] = LEUKOLAB_MEAN,
                 std: Sequence[float] = LEUKOLAB_STD) -> None:
        super().__init__()
        if not encoders or len(encoders) != len(records):
            raise LeukolabError("a fusion backbone needs at least one encoder (one record per encoder)")
        self.img_size = int(img_size)
        self.encoders = nn.ModuleList(FusedEncoder(e, r, img_size, mean, std, norm)
                                      for e, r in zip(encoders, records, strict=True))
        self.records = list(records)
        self.norm = norm
        self.num_features = sum(r.num_features for r in records)

    def train(self, mode: bool = True) -> FusionBackbone:
        super().train(mode)
        self.encoders.eval()  # frozen: always the features the head is (or was) trained on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.shape[1] == self.num_features:  # cached features
            return x
        return torch.cat([enc(x) for enc in self.encoders], dim=1)


@BACKBONES.register("fusion")
def fusion_backbone(img_size: int, encoders: Sequence[Mapping[str, Any]] = (), norm: str = "layernorm",
                    **kwargs: Any) -> FusionBackbone:
    """The ``fusion`` backbone: :class:`FusionBackbone` over the encoders ``encoders`` (records as plain
    dicts) with random weights; the pipeline loads them (training) or the run's checkpoint does (evaluate)."""
    if kwargs:
        raise LeukolabError(f"fusion backbone: unknown option(s) {', '.join(sorted(kwargs))}; "
                            "expected encoders and norm")
    records = [EncoderRecord.from_dict(r) for r in encoders]
    if not records:
        raise LeukolabError("the fusion backbone has no encoders; expected at least one --fuse RUN")
    return FusionBackbone([build_encoder(r) for r in records], records, img_size, norm)
