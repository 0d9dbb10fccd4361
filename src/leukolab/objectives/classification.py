"""Supervised classification: cross-entropy on a :class:`~leukolab.models.classifier.Classifier`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.evaluation.metrics import classification_metrics
from leukolab.objectives.base import Objective, StepOutput, decay_groups
from leukolab.registry import OBJECTIVES


@OBJECTIVES.register("classification")
class ClassificationObjective(Objective):
    """Cross-entropy (optionally class-weighted, label-smoothed); best model by validation balanced accuracy."""

    monitor = "val_balanced_accuracy"
    monitor_mode = "max"

    def __init__(
        self,
        model: nn.Module,
        class_names: list[str],
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        extras: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 < layer_decay <= 1.0:
            raise LeukolabError(f"layer decay {layer_decay} is outside (0, 1]; expected e.g. 0.75 (1 = off)")
        self.layer_decay = float(layer_decay)
        self.model = model
        self.class_names = list(class_names)
        self.register_buffer("class_weights", class_weights if class_weights is not None else None, persistent=False)
        self.label_smoothing = label_smoothing
        self.extras = extras or {}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """With ``layer_decay`` < 1: layer-wise learning-rate decay over the backbone (timm's BEiT/MAE recipe).

        Block ``i`` of ``L`` gets ``layer_decay ** (L - i)`` of the learning rate (the stem the least,
        the head the full rate), as an ``lr_scale`` entry per group that the Trainer applies.
        """
        backbone = getattr(self.model, "backbone", None)
        if self.layer_decay >= 1.0 or backbone is None:
            return super().parameter_groups(weight_decay)
        from timm.optim import param_groups_layer_decay

        skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
        groups = param_groups_layer_decay(backbone, weight_decay, no_weight_decay_list=skip,
                                          layer_decay=self.layer_decay)
        head = ((n, p) for n, p in self.named_parameters() if not n.startswith("model.backbone."))
        groups += decay_groups(head, weight_decay, lr_scale=1.0)
        return [g for g in groups if g["params"]]

    def training_step(self, batch: Any) -> StepOutput:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, weight=self.class_weights, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean().item()
        return StepOutput(loss, {"acc": acc}, batch_size=int(y.shape[0]))

    @torch.no_grad()
    def predict(self, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (N, C), targets (N,))`` over a loader."""
        self.eval()
        probs, targets = [], []
        for x, y in loader:
            logits = self.model(x.to(device))
            probs.append(torch.softmax(logits.float(), 1).cpu())
            targets.append(torch.as_tensor(y))
        return torch.cat(probs).numpy(), torch.cat(targets).numpy()

    @torch.no_grad()
    def validate(self, loader: Any, device: torch.device) -> dict[str, float]:
        probs, y = self.predict(loader, device)
        loss = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)).item()
        m = classification_metrics(y, probs.argmax(1), self.class_names)
        return {
            "val_loss": loss,
            "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"],
            "val_f1_macro": m["f1_macro"],
        }

    def export_backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.backbone.state_dict().items()}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"class_names": self.class_names, **self.extras}
