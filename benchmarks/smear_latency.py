"""Milliseconds per 640x480 smear field for ``leukolab smear analyse``: one detector, two classifiers, +/- TTA.

End to end is what ``smear analyse`` does per field (``SmearAnalyser.field``):
decode the JPEG -> detect (resize, network, peak picking) -> keep the white
cells -> square crops with a margin -> classify them with the equal-weight
ensemble of the classifiers (each at its own input size; with ``--tta`` over
the 8 dihedral views) -> draw the annotated field and encode it as PNG.
Synthetic 640x480 fields; the anchor is Cytologia's full ensemble, 462 ms per
image on an RTX 3090.

Trained runs (``--detector RUN --classifier RUN --classifier RUN``) are timed
as they are. Without them the models have random weights (the cost hardly
depends on the weights): the detector is the ``detect train`` default
(CenterNet, MobileNetV4-small, 320 px) and, since a random detector finds
either nothing or hundreds of cells, its ``--cells`` highest-scoring boxes per
field are taken as the white cells (about a real field's count: BCCD has 1-2).
The classifiers default to a CNN and a transformer as in Cytologia's ensemble:
ResNet-18 at 64 px and ViT-Tiny/16 at 96 px.

    python benchmarks/smear_latency.py [--detector RUN] [--classifier RUN ...] [--threads 2] [--n 10] [--cells 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukolab.data.synthetic.smears import make_smears
from leukolab.models.classifier import build_classifier
from leukolab.pipelines.predictors import EnsemblePredictor, RunPredictor
from leukolab.pipelines.smear import SmearAnalyser, SmearOptions, load_classifiers
from leukolab.registry import DETECTORS

ANCHOR_MS = 462.0
CLASSES = ["background", "basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


class TopK(torch.nn.Module):
    """A random-weight detector whose ``cells`` best boxes per image (any score) are reported as white cells."""

    def __init__(self, detector: Any, cells: int) -> None:
        super().__init__()
        self.inner, self.cells = detector, cells
        self.num_classes, self.stride = detector.num_classes, detector.stride

    def predict(self, batch: torch.Tensor, score_threshold: float, max_detections: int) -> list[dict[str, Any]]:
        out = self.inner.predict(batch, score_threshold=0.0, max_detections=self.cells)
        for det in out:
            det["labels"] = torch.zeros_like(det["labels"])  # class 0: wbc
            det["scores"] = torch.ones_like(det["scores"])
        return out


def _random_models(cells: int, specs: list[str]) -> tuple[Any, dict[str, Any], Any, str]:
    detector = DETECTORS.build("centernet", num_classes=3, img_size=320, backbone="mobilenetv4_conv_small",
                               channels=64).eval()
    meta = {"classes": ["wbc", "rbc", "platelets"], "img_size": 320, "field_size": 640, "largest_box": 220.0}
    members = []
    for spec in specs:
        name, size = spec.rsplit(":", 1)
        model = build_classifier({"backbone": name, "drop_path": 0.0}, int(size), len(CLASSES)).eval()
        members.append(RunPredictor(model, CLASSES, int(size)))
    ensemble = EnsemblePredictor(members, np.full(len(members), 1.0 / len(members)), CLASSES)
    return TopK(detector, cells), meta, ensemble, f"random weights, top {cells} boxes as cells; " + " + ".join(specs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", type=Path, default=None, help="trained detect run (default: random weights)")
    p.add_argument("--classifier", type=Path, action="append", default=None, help="classifier run (repeat)")
    p.add_argument("--backbones", default="resnet18:64,vit_tiny_patch16_224:96", help="random classifiers NAME:SIZE")
    p.add_argument("--cells", type=int, default=2, help="white cells per field with a random detector")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=10, help="timed fields per setting")
    p.add_argument("--no-draw", action="store_true", help="leave out drawing + PNG-encoding the annotated field")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    if args.detector is not None:
        from leukolab.pipelines.detect import load_detector

        detector, meta = load_detector(args.detector, cpu)
        if not args.classifier:
            p.error("--detector needs --classifier")
        predictor_of = lambda tta: load_classifiers(args.classifier, tta, cpu)  # noqa: E731
        name = f"{args.detector} + {', '.join(map(str, args.classifier))}"
    else:
        detector, meta, ensemble, name = _random_models(args.cells, args.backbones.split(","))

        def predictor_of(tta: bool) -> Any:
            for m in ensemble.members:
                m.tta = tta
            return ensemble

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_smears(Path(tmp) / "f", 5, width=640, height=480, seed=0, progress=False)
        files = sorted((root / "images").glob("*.jpg"))
        for tta in (False, True):
            opts = SmearOptions(tta=tta, device="cpu", draw=not args.no_draw, progress=False)
            analyser = SmearAnalyser(detector, meta, predictor_of(tta), opts)
            for f in files[:2]:  # warm-up
                analyser.field(f)
            cells, t = 0, time.perf_counter()
            for i in range(args.n):
                cells += len(analyser.field(files[i % len(files)]).scores)
            ms = (time.perf_counter() - t) / args.n * 1000
            rows.append({"tta": tta, "ms_per_field": round(ms, 1), "cells_per_field": cells / args.n,
                         "ratio_to_anchor": round(ms / ANCHOR_MS, 3)})

    print(f"{name}; {args.threads} thread(s); drawing {'off' if args.no_draw else 'on'}")
    print(f"{'TTA':>5} {'ms / 640x480 field':>19} {'cells / field':>14} {'x 462 ms anchor':>16}")
    for r in rows:
        print(f"{'on' if r['tta'] else 'off':>5} {r['ms_per_field']:19.1f} {r['cells_per_field']:14.1f} "
              f"{r['ratio_to_anchor']:16.3f}")
    print(json.dumps({"models": name, "threads": args.threads, "anchor_ms": ANCHOR_MS, "rows": rows}))


if __name__ == "__main__":
    main()
