"""Convolutional auto-encoder pretraining (seed 001): the batch -> loss glue around :mod:`leukolab.models.autoencoder`.

The network is :class:`~leukolab.models.autoencoder.ConvAutoencoder` (a timm CNN
encoder and a small upsampling decoder), the loss
:func:`~leukolab.losses.ae_loss.reconstruction_loss` on normalised pixels, the
figure :class:`leukolab.evaluation.reconstructions.ReconstructionFigure`. The
training images are MAE's random resized crops and flips; the target is the
input itself. The exported backbone is the encoder, in the layout of
``create_backbone(name, img_size)``, so ``leukolab train --backbone NAME --init RUN``
loads it as it loads an MAE encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leukolab.checkpoints import BackboneSpec
from leukolab.data.transforms import eval_transform, mae_transform
from leukolab.errors import LeukolabError
from leukolab.losses.ae_loss import reconstruction_loss
from leukolab.models.autoencoder import AEConfig, ConvAutoencoder, require_cnn
from leukolab.models.backbones import create_backbone
from leukolab.models.spec import describe_backbone
from leukolab.objectives.base import PretrainObjective, StepOutput, backbone_fields
from leukolab.objectives.mae import images_of
from leukolab.registry import OBJECTIVES


@OBJECTIVES.register("ae", tags=("pretrain",))
class AEObjective(PretrainObjective):
    """A convolutional auto-encoder on normalised images; ``options`` is the ``ae:`` config section."""

    #: the backbone ``leukolab pretrain --method ae`` uses when none is named
    default_backbone = "resnet18"

    def __init__(self, backbone: str, img_size: int, backbone_kwargs: dict[str, Any] | None = None,
                 drop_path: float = 0.0, **options: Any) -> None:
        super().__init__()
        self.config = AEConfig(**options)
        self.img_size = int(img_size)
        kwargs = dict(backbone_kwargs or {})
        if kwargs.get("reg_tokens"):
            raise LeukolabError(f"--method ae: backbone {backbone} is not a Vision Transformer and takes no "
                                "register tokens; expected --registers 0")
        encoder = require_cnn(create_backbone(backbone, img_size, drop_path, **kwargs), backbone)
        self.model = ConvAutoencoder(encoder, self.img_size, self.config, backbone)
        self.spec = describe_backbone(encoder, backbone, self.img_size, kwargs)

    def transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(train, validation)`` image transforms: random resized crops and flips / resize only."""
        return mae_transform(self.img_size), eval_transform(self.img_size)

    def loss(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, logs)`` of a batch of normalised images against their reconstruction."""
        return reconstruction_loss(self.model(imgs), imgs, self.config.loss)

    def training_step(self, batch: Any) -> StepOutput:
        imgs = images_of(batch)
        loss, logs = self.loss(imgs)
        return StepOutput(loss, logs, batch_size=int(imgs.shape[0]))

    def validation_step(self, batch: Any) -> dict[str, Any]:
        imgs = images_of(batch)
        loss, logs = self.loss(imgs)
        return {"loss": float(loss.detach()), **logs, "batch_size": int(imgs.shape[0])}

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        return self.spec

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "pretrain-ae", **backbone_fields(self.spec)}
