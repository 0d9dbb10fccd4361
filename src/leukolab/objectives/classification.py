"""Supervised classification: cross-entropy on a :class:`~leukolab.models.classifier.Classifier`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from leukolab.checkpoints import BackboneSpec
from leukolab.data.mixing import BatchMixer, MixConfig
from leukolab.errors import LeukolabError
from leukolab.models.classifier import Classifier
from leukolab.objectives.base import Objective, StepOutput, decay_groups
from leukolab.registry import OBJECTIVES

#: ``scorer(y_true, y_pred, class_names) -> {"accuracy", "balanced_accuracy", "f1_macro", ...}``
Scorer = Callable[[np.ndarray, np.ndarray, list[str]], dict[str, Any]]


@OBJECTIVES.register("classification")
class ClassificationObjective(Objective):
    """Cross-entropy (optionally class-weighted, label-smoothed); best model by validation balanced accuracy.

    ``scorer`` (the pipeline passes :func:`leukolab.evaluation.metrics.classification_metrics`)
    turns the validation predictions into ``val_accuracy``, ``val_balanced_accuracy`` and
    ``val_f1_macro``; without one, validation reports ``val_loss`` only and picks by it.

    ``mix`` (enabled): training batches go through :attr:`batch_transform`, a
    :class:`~leukolab.data.mixing.BatchMixer` (timm's MixUp / CutMix, with this objective's
    label smoothing) that turns their targets into soft targets; validation is never mixed.
    """

    monitor = "val_balanced_accuracy"
    monitor_mode = "max"

    def __init__(
        self,
        model: Classifier,
        class_names: list[str],
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        layer_decay: float = 1.0,
        scorer: Scorer | None = None,
        mix: MixConfig | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < layer_decay <= 1.0:
            raise LeukolabError(f"layer decay {layer_decay} is outside (0, 1]; expected e.g. 0.75 (1 = off)")
        self.model = model
        self.class_names = list(class_names)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.label_smoothing = float(label_smoothing)
        self.layer_decay = float(layer_decay)
        self.scorer = scorer
        #: training batches only: ``(x, class indices) -> (x, soft targets (N, C))``, or ``None``
        self.batch_transform: BatchMixer | None = (
            BatchMixer(mix, len(self.class_names), self.label_smoothing) if mix is not None and mix.enabled else None
        )
        if scorer is None:
            self.monitor, self.monitor_mode = "val_loss", "min"

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """With ``layer_decay`` < 1: layer-wise learning-rate decay over the backbone (timm's BEiT/MAE recipe).

        Block ``i`` of ``L`` gets ``layer_decay ** (L - i)`` of the learning rate (the stem the least,
        the head the full rate), as an ``lr_scale`` entry per group that the Trainer applies.
        """
        if self.layer_decay >= 1.0:
            return super().parameter_groups(weight_decay)
        from timm.optim import param_groups_layer_decay

        backbone = self.model.backbone
        skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
        groups = param_groups_layer_decay(backbone, weight_decay, no_weight_decay_list=skip,
                                          layer_decay=self.layer_decay)
        head = ((n, p) for n, p in self.named_parameters() if not n.startswith("model.backbone."))
        groups += decay_groups(head, weight_decay, lr_scale=1.0)
        return [g for g in groups if g["params"]]

    def training_step(self, batch: Any) -> StepOutput:
        """Cross-entropy of a batch; with :attr:`batch_transform`, against its soft targets.

        Soft targets already hold the label smoothing (the mixer applies it before mixing), so
        their loss is ``-sum_c w_c q_c log p_c`` averaged over the batch (torch's cross-entropy with
        class-probability targets; timm's ``SoftTargetCrossEntropy`` without class weights) and
        ``acc`` compares the prediction with the soft target's largest class.
        """
        x, y = batch
        if self.batch_transform is not None:
            x, y = self.batch_transform(x, y)
        logits = self.model(x)
        if y.ndim == 2:  # soft targets
            loss = F.cross_entropy(logits.float(), y.float(), weight=self.class_weights)
            y = y.argmax(1)
        else:
            loss = F.cross_entropy(logits.float(), y, weight=self.class_weights, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean().item()
        return StepOutput(loss, {"acc": acc}, batch_size=int(y.shape[0]))

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Class probabilities and targets of a batch (on the CPU)."""
        x, y = batch
        return {"probs": torch.softmax(self.model(x).float(), 1).cpu(), "targets": torch.as_tensor(y).cpu()}

    def validation_epoch_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """``val_loss`` (negative log-likelihood) and, with a scorer, accuracy, balanced accuracy and macro F1."""
        probs = torch.cat([o["probs"] for o in outputs])
        y = torch.cat([o["targets"] for o in outputs])
        row = {"val_loss": F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()}
        if self.scorer is not None:
            m = self.scorer(y.numpy(), probs.argmax(1).numpy(), self.class_names)
            row.update({f"val_{k}": float(m[k]) for k in ("accuracy", "balanced_accuracy", "f1_macro")})
        return {**row, **self.model.parameter_counts()}  # trainable_params / _share, adapter: history.csv records them

    @torch.no_grad()
    def predict(self, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (N, C), targets (N,))`` over a loader of ``(images, targets)``."""
        self.eval()
        outs = [self.validation_step((x.to(device), y)) for x, y in loader]
        return torch.cat([o["probs"] for o in outs]).numpy(), torch.cat([o["targets"] for o in outs]).numpy()

    def export_backbone(self) -> dict[str, torch.Tensor] | None:
        if self.model.adapter is not None and self.model.adapter_init:
            return None  # an adapter run references its frozen --init backbone (the checkpoint's "adapter" entry)
        return {k: v.detach().cpu() for k, v in self.model.backbone.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec | None:
        return self.model.spec

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "classification", "class_names": self.class_names, **self.model.adapter_entries()}
