"""Multiple-instance learning: a patient's bag of cells (and clinical data) -> reactive / tumoral.

The batch is :func:`leukolab.data.mil.collate_bags`' dict. ``x`` holds either
cached cell embeddings ``(B, N, D)`` (the fast path: the encoder ran once,
before training) or cell images ``(B, N, 3, H, W)``, which the objective's
``encoder`` embeds first (end-to-end fine-tuning, or a frozen encoder on the
fly). The networks live in :mod:`leukolab.models.mil`; the loss is
cross-entropy (``torch.nn.functional.cross_entropy``, optionally class-weighted)
plus, for aggregators that return expert logits (``moe``), ``aux_weight`` times
the mean of the experts' own cross-entropies.

With an ``adapter`` (:mod:`leukolab.models.adapters`, hooked into ``encoder``)
the encoder stays frozen and in eval mode; gradients flow through it into the
adapter, which trains with the aggregator. Checkpoints then carry the adapter
as its own small ``adapter`` entry
(:func:`~leukolab.models.adapters.state.adapter_record`) and reference the
frozen encoder by its file (``encoder_init``) and SHA-256 instead of storing
it; an encoder without a file (a seeded random timm model) is stored as
``backbone``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from leukolab.checkpoints import BackboneSpec
from leukolab.models.adapters import Adapter, parameter_columns
from leukolab.models.adapters.state import adapter_record, reference_backbone, weights_fingerprint
from leukolab.models.mil import Aggregator, MILOutput
from leukolab.models.tokens import pool_features
from leukolab.objectives.base import Objective, StepOutput
from leukolab.registry import OBJECTIVES

#: ``scorer(y_true, prob_of_label_1) -> {"balanced_accuracy": ..., "roc_auc": ...}``
Scorer = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@OBJECTIVES.register("mil")
class MILObjective(Objective):
    """Cross-entropy on bag logits; the best model by validation loss.

    Args:
        aggregator: the MIL network (``AGGREGATORS.build(...)``).
        encoder: a headless backbone for image bags; ``None`` for cached embeddings.
        train_encoder: fine-tune ``encoder`` end to end (else it is frozen and kept in eval mode).
        encoder_spec: how to rebuild ``encoder`` (stored with its weights when it is trained).
        pool: how the encoder's tokens become one embedding per cell (see
            :func:`~leukolab.models.tokens.pool_features`).
        class_weights: ``(K,)`` loss weights (inverse class frequency), or ``None``.
        aux_weight: weight of the experts' own losses (``moe``).
        scorer: turns validation probabilities into ``val_*`` scores (the pipeline
            passes :func:`leukolab.evaluation.mil.mil_scorer`).
        extras: plain data stored in every checkpoint (aggregator name and options,
            clinical features, encoder source ...).
        adapter: an adapter already hooked into ``encoder`` (``apply_adapter``, which froze the
            encoder): the adapter trains, the encoder's weights do not (implies gradients through it).
        encoder_init: the file the frozen encoder of an ``adapter`` was loaded from; checkpoints then
            reference it instead of storing the encoder (``None``: they store it).
    """

    monitor = "val_loss"
    monitor_mode = "min"

    def __init__(
        self,
        aggregator: Aggregator,
        encoder: nn.Module | None = None,
        *,
        train_encoder: bool = False,
        encoder_spec: BackboneSpec | None = None,
        pool: str = "cls",
        class_weights: Tensor | None = None,
        aux_weight: float = 0.5,
        scorer: Scorer | None = None,
        extras: dict[str, Any] | None = None,
        adapter: Adapter | None = None,
        encoder_init: str | None = None,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.encoder = encoder
        self.adapter = adapter
        if adapter is not None and encoder is None:
            raise ValueError("an adapter needs the encoder it is hooked into")
        self.train_encoder = bool((train_encoder or adapter is not None) and encoder is not None)
        self.encoder_init = encoder_init if adapter is not None else None
        self.encoder_sha256 = weights_fingerprint(encoder.state_dict()) if adapter is not None else None
        if adapter is not None and encoder_init:
            reference_backbone(self, "encoder")  # the frozen weights stay in their file, not in every checkpoint
        self.encoder_spec = encoder_spec
        self.pool = pool
        if encoder is not None and not self.train_encoder:
            encoder.requires_grad_(False)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.aux_weight = float(aux_weight)
        self.scorer = scorer
        self.extras = dict(extras or {})

    def train(self, mode: bool = True) -> MILObjective:
        super().train(mode)
        if self.encoder is not None and (not self.train_encoder or self.adapter is not None):
            self.encoder.eval()  # a frozen encoder keeps its statistics, no dropout (an adapter keeps its own mode)
        return self

    def parameter_counts(self) -> dict[str, Any]:
        """History columns: ``trainable_params``, ``trainable_share`` (of everything the objective holds,
        the encoder included) and ``adapter`` (its config, or ``none``)."""
        return parameter_columns(self, self.adapter)

    def encode(self, images: Tensor, mask: Tensor) -> Tensor:
        """``(B, N, 3, H, W)`` cell images -> ``(B, N, D)`` embeddings (zeros where padded)."""
        assert self.encoder is not None
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            feats = pool_features(self.encoder, images[mask], self.pool).float()
        out = feats.new_zeros((*mask.shape, feats.shape[-1]))
        out[mask] = feats
        return out

    def forward(self, batch: dict[str, Tensor]) -> MILOutput:
        """The aggregator's output for a batch of bags (image bags are embedded first)."""
        x, mask = batch["x"], batch["mask"]
        if x.ndim == 5:
            if self.encoder is None:
                raise ValueError("image bags need an encoder; this objective has none")
            x = self.encode(x, mask)
        return self.aggregator(x, mask, batch["clinical"])

    def loss(self, out: MILOutput, y: Tensor) -> Tensor:
        """Cross-entropy of the bag logits (+ ``aux_weight`` x the experts' mean cross-entropy)."""
        loss = F.cross_entropy(out.logits.float(), y, weight=self.class_weights)
        if out.aux_logits and self.aux_weight:
            aux = torch.stack([F.cross_entropy(a.float(), y, weight=self.class_weights) for a in out.aux_logits])
            loss = loss + self.aux_weight * aux.mean()
        return loss

    def training_step(self, batch: dict[str, Tensor]) -> StepOutput:
        y = batch["label"]
        out = self(batch)
        acc = (out.logits.argmax(1) == y).float().mean().item()
        return StepOutput(self.loss(out, y), {"acc": acc}, batch_size=int(y.shape[0]))

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Tumoral probabilities, targets and patient indices of a batch (on the CPU)."""
        out = self(batch)
        probs = torch.softmax(out.logits.float(), 1)
        return {"probs": probs.cpu(), "targets": batch["label"].cpu(), "index": batch["index"].cpu()}

    def validation_epoch_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """``val_loss`` (negative log-likelihood) and, with a scorer, ``val_balanced_accuracy`` etc."""
        probs = torch.cat([o["probs"] for o in outputs])
        y = torch.cat([o["targets"] for o in outputs])
        row = {"val_loss": F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()}
        if self.scorer is not None:
            row.update({f"val_{k}": v for k, v in self.scorer(y.numpy(), probs[:, 1].numpy()).items()})
        if self.encoder is not None:  # end to end: history.csv records what trains (cached embeddings: the aggregator)
            row.update(self.parameter_counts())
        return row

    def export_backbone(self) -> dict[str, Tensor] | None:
        """The fine-tuned encoder (timm naming); ``None`` for a frozen or absent one, and for the frozen
        encoder of an adapter when its file is referenced (``encoder_init``)."""
        if not self.train_encoder or self.encoder is None or self.encoder_init:
            return None
        return {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec | None:
        return self.encoder_spec if self.train_encoder else None

    def checkpoint_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {"task": "mil", **self.extras}
        if self.adapter is not None and self.encoder is not None:
            assert self.encoder_sha256 is not None
            extras["adapter"] = adapter_record(self.adapter, self.encoder, self.encoder_init, self.encoder_sha256)
        return extras
