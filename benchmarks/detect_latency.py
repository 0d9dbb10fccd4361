"""Milliseconds per 640x480 smear field: leukolab's whole detection path vs the bare forward pass.

End to end is what ``leukolab detect predict`` does per image, batch 1:
decode the JPEG -> resize to the model's size -> detect -> peak picking / NMS ->
boxes in image pixels (:func:`leukolab.models.detection_infer.predict_field`).
The bare pass is the detector's ``forward`` on an already resized uint8 tensor.
Their ratio is the overhead of everything around the network. Random weights
unless ``--run`` names a trained run (the cost barely depends on the weights).

    python benchmarks/detect_latency.py [--run RUN] [--detector centernet] [--img-size 320] [--threads 2] [--n 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leukolab.data.dataset import load_rgb
from leukolab.data.synthetic.smears import make_smears
from leukolab.models.detection_infer import _to_tensor, predict_field
from leukolab.registry import DETECTORS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="trained detect run (default: random weights)")
    p.add_argument("--detector", default="centernet")
    p.add_argument("--backbone", default="mobilenetv4_conv_small", help="centernet backbone")
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=20, help="timed fields")
    p.add_argument("--score", type=float, default=0.3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.run is not None:
        from leukolab.pipelines.detect import load_detector

        detector, meta = load_detector(args.run, torch.device("cpu"))
        img_size, name = int(meta["img_size"]), f"{meta['detector']} ({args.run})"
    else:
        kw = {"backbone": args.backbone, "channels": 64} if args.detector == "centernet" else {}
        detector = DETECTORS.build(args.detector, num_classes=3, img_size=args.img_size, **kw).eval()
        img_size, name = args.img_size, f"{args.detector} (random weights)"

    with tempfile.TemporaryDirectory() as tmp:
        root = make_smears(Path(tmp) / "f", 5, width=640, height=480, seed=0, progress=False)
        files = sorted((root / "images").glob("*.jpg"))

        def end_to_end(path: Path) -> int:
            image = np.asarray(load_rgb(path))
            return len(predict_field(detector, image, img_size / max(image.shape[:2]), args.score).boxes)

        tensor = _to_tensor(np.asarray(load_rgb(files[0])), img_size / 640)[None]
        pad = -(-tensor.shape[-2] // detector.stride) * detector.stride - tensor.shape[-2]
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, pad))

        def bare() -> None:
            with torch.no_grad():
                detector(tensor)

        for _ in range(3):  # warm-up
            end_to_end(files[0])
            bare()
        t = time.perf_counter()
        for i in range(args.n):
            end_to_end(files[i % len(files)])
        e2e = (time.perf_counter() - t) / args.n * 1000
        t = time.perf_counter()
        for _ in range(args.n):
            bare()
        fwd = (time.perf_counter() - t) / args.n * 1000

    print(f"{name}, input {tuple(tensor.shape[-2:])}, {args.threads} thread(s)")
    print(f"end to end (decode -> resize -> detect -> NMS -> boxes): {e2e:7.1f} ms / 640x480 field")
    print(f"bare forward pass:                                       {fwd:7.1f} ms")
    print(f"ratio: {e2e / fwd:.2f}")
    print(json.dumps({"detector": name, "threads": args.threads, "end_to_end_ms": round(e2e, 1),
                      "forward_ms": round(fwd, 1), "ratio": round(e2e / fwd, 3)}))


if __name__ == "__main__":
    main()
