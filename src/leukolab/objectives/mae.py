"""Masked auto-encoder pretraining (He et al. 2022): the batch -> loss glue around :mod:`leukolab.models.mae`.

The network is :class:`~leukolab.models.mae.MaskedAutoencoder`, the loss
:func:`~leukolab.losses.mae_loss.mae_loss` (mean squared error on the masked
patches, of per-patch normalised pixels with ``norm_pix_loss``), the
reconstruction figure :class:`leukolab.evaluation.reconstructions.ReconstructionFigure`.
Validation uses the same masks every epoch. The exported backbone is the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leukolab.checkpoints import BackboneSpec
from leukolab.data.transforms import eval_transform, mae_transform
from leukolab.losses.mae_loss import mae_loss
from leukolab.models.backbones import create_backbone
from leukolab.models.mae import MAEConfig, MaskedAutoencoder, patchify, require_vit
from leukolab.models.spec import describe_backbone
from leukolab.objectives.base import PretrainObjective, StepOutput, backbone_fields
from leukolab.registry import OBJECTIVES


def images_of(batch: Any) -> torch.Tensor:
    """The images of an unlabelled batch: ``(images, targets)`` or the images themselves."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@OBJECTIVES.register("mae", tags=("pretrain",))
class MAEObjective(PretrainObjective):
    """MAE on images normalised by :mod:`leukolab.data.transforms`; ``options`` is the ``mae:`` config section."""

    def __init__(self, backbone: str, img_size: int, backbone_kwargs: dict[str, Any] | None = None,
                 drop_path: float = 0.0, **options: Any) -> None:
        super().__init__()
        self.config = MAEConfig(**options)
        self.img_size = int(img_size)
        kwargs = dict(backbone_kwargs or {})
        encoder = require_vit(create_backbone(backbone, img_size, drop_path, **kwargs), backbone, "MAE")
        self.model = MaskedAutoencoder(encoder, self.config)
        self.spec = describe_backbone(encoder, backbone, self.img_size, kwargs)
        self._val_generator: torch.Generator | None = None

    def transforms(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(train, validation)`` image transforms: random resized crops and flips / resize only."""
        return mae_transform(self.img_size), eval_transform(self.img_size)

    def loss(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """``(loss, logs)`` of a batch of images (masks from ``generator`` when given)."""
        pred, mask = self.model(imgs, generator)
        c = self.config
        return mae_loss(pred, patchify(imgs, self.model.patch), mask, c.norm_pix_loss, c.visible_loss_weight)

    def training_step(self, batch: Any) -> StepOutput:
        imgs = images_of(batch)
        loss, logs = self.loss(imgs)
        return StepOutput(loss, logs, batch_size=int(imgs.shape[0]))

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Masked-patch loss; the masks come from a generator seeded at the first batch of each validation."""
        if self._val_generator is None:
            self._val_generator = torch.Generator().manual_seed(0)
        imgs = images_of(batch)
        loss, _ = self.loss(imgs, self._val_generator)
        return {"loss": float(loss.detach()), "batch_size": int(imgs.shape[0])}

    def validation_epoch_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        self._val_generator = None  # the next validation sees the same masks
        return super().validation_epoch_end(outputs)

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec:
        return self.spec

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "pretrain-mae", **backbone_fields(self.spec)}

