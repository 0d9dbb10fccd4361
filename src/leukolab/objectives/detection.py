"""Object detection: the detector's own losses; best model by validation mAP at IoU 0.5."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leukolab.checkpoints import BackboneSpec
from leukolab.models.detection import Detector
from leukolab.objectives.base import Objective, StepOutput
from leukolab.registry import OBJECTIVES

#: ``scorer(ground_truths, predictions, classes) -> {"map50", "map50_95", "ap50": {class: AP}, ...}``; each
#: ground truth is ``(boxes (N, 4), labels (N,))`` and each prediction ``(boxes, scores, labels)``, numpy arrays
Scorer = Callable[[list[tuple], list[tuple], list[str]], dict[str, Any]]


def _to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


@OBJECTIVES.register("detection")
class DetectionObjective(Objective):
    """Sum of the detector's losses; validation predicts every field and scores it with ``scorer``.

    ``scorer`` (the pipeline passes COCO evaluation, :mod:`leukolab.evaluation.detection`)
    turns the validation predictions into ``val_map50``, ``val_map50_95`` and
    ``val_ap50_<class>``; ``best.pt`` is the epoch with the highest ``val_map50``.
    Without a scorer validation reports the number of detections only and the last epoch is best.
    """

    monitor = "val_map50"
    monitor_mode = "max"
    #: a timm backbone's classifier-side layers (e.g. MobileNetV4's conv_head) feed no detector output
    ddp_find_unused_parameters = True

    def __init__(
        self,
        model: Detector,
        classes: list[str],
        detector: str,
        detector_kwargs: dict[str, Any],
        img_size: int,
        scorer: Scorer | None = None,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        self.model = model
        self.classes = list(classes)
        self.detector = detector
        self.detector_kwargs = dict(detector_kwargs)
        self.img_size = int(img_size)
        self.scorer = scorer
        self.max_detections = int(max_detections)
        if scorer is None:
            self.monitor, self.monitor_mode = "val_detections", "max"

    def training_step(self, batch: Any) -> StepOutput:
        images, targets = batch
        losses = self.model.losses(images, _to(targets, images.device))
        loss = sum(losses.values())
        return StepOutput(loss, {k: float(v.detach()) for k, v in losses.items()}, batch_size=int(images.shape[0]))

    def validation_step(self, batch: Any) -> dict[str, Any]:
        images, targets = batch
        preds = self.model.predict(images, score_threshold=0.01, max_detections=self.max_detections)
        return {
            "gts": [(t["boxes"].cpu().numpy(), t["labels"].cpu().numpy()) for t in targets],
            "preds": [(p["boxes"].float().cpu().numpy(), p["scores"].float().cpu().numpy(), p["labels"].cpu().numpy())
                      for p in preds],
            "batch_size": int(images.shape[0]),
        }

    def validation_epoch_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        gts = [g for o in outputs for g in o["gts"]]
        preds = [p for o in outputs for p in o["preds"]]
        if self.scorer is None:
            return {"val_detections": float(sum(len(p[1]) for p in preds)) / max(1, len(preds))}
        m = self.scorer(gts, preds, self.classes)
        out = {"val_map50": float(m["map50"]), "val_map50_95": float(m["map50_95"])}
        for c, v in m["ap50"].items():
            if v is not None:
                out[f"val_ap50_{c.replace(' ', '_')}"] = float(v)
        return out

    def export_backbone(self) -> dict[str, torch.Tensor] | None:
        bb = self.model.timm_backbone()
        return None if bb is None else {k: v.detach().cpu() for k, v in bb.state_dict().items()}

    def backbone_spec(self) -> BackboneSpec | None:
        bb = self.model.timm_backbone()
        if bb is None or self.model.backbone_name is None:
            return None
        kwargs = dict(self.detector_kwargs.get("backbone_kwargs") or {})
        patch = getattr(getattr(bb, "patch_embed", None), "patch_size", None)
        mean = tuple(float(v) for v in (self.model.mean.flatten() / 255.0).tolist())
        std = tuple(float(v) for v in (self.model.std.flatten() / 255.0).tolist())
        patch_size = int(patch[0]) if patch else None
        return BackboneSpec(self.model.backbone_name, kwargs, self.img_size, patch_size, mean, std)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": "detection", "classes": list(self.classes), "detector": self.detector,
                "detector_kwargs": dict(self.detector_kwargs), "img_size": self.img_size}
