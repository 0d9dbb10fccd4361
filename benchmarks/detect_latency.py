"""Milliseconds per 640x480 smear field: leukolab's whole detection path vs the bare forward pass.

End to end is what ``leukolab detect predict`` does per image, batch 1:
decode the JPEG -> resize to the model's size -> detect -> peak picking / NMS ->
boxes in image pixels (:func:`leukolab.models.detection_infer.predict_field`).
The bare pass is the detector's ``forward`` on an already resized uint8 tensor.
Their ratio is the overhead of everything around the network. Random weights
unless ``--run`` names a trained run (the cost barely depends on the weights).
``--backend onnx`` runs the network in ONNX Runtime (CPU; ``pip install
'leukolab[onnx]'``) with the same pre- and post-processing; ``both`` times the
two backends alternately on the same fields and prints the onnx / torch ratios.

    python benchmarks/detect_latency.py [--run RUN] [--detector centernet] [--img-size 320] [--threads 2] [--n 20]
                                        [--backend torch|onnx|both]
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
    p.add_argument("--backend", choices=("torch", "onnx", "both"), default="torch")
    p.add_argument("--tta", action="store_true", help="end to end with flip TTA (4 forward passes; bare stays 1)")
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

        tensor = _to_tensor(np.asarray(load_rgb(files[0])), img_size / 640)[None]
        pad = -(-tensor.shape[-2] // detector.stride) * detector.stride - tensor.shape[-2]
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, pad))

        runners: dict[str, tuple[object, object]] = {}
        if args.backend in ("torch", "both"):
            def bare_torch() -> None:
                with torch.no_grad():
                    detector(tensor)

            runners["torch"] = (detector, bare_torch)
        if args.backend in ("onnx", "both"):
            from leukolab.models.detection_onnx import OnnxDetector

            t = time.perf_counter()
            onnx_detector = OnnxDetector(detector, threads=args.threads)
            print(f"onnx: export + session {time.perf_counter() - t:.2f} s (once per predict run)")
            array = tensor.numpy()
            runners["onnx"] = (onnx_detector, lambda: onnx_detector.forward_numpy(array))

        def end_to_end(det: object, path: Path) -> int:
            image = np.asarray(load_rgb(path))
            return len(predict_field(det, image, img_size / max(image.shape[:2]), args.score, tta=args.tta).boxes)

        totals = {b: {"e2e": 0.0, "fwd": 0.0} for b in runners}
        for det, bare in runners.values():  # warm-up
            for _ in range(3):
                end_to_end(det, files[0])
                bare()
        for i in range(args.n):  # backends alternate, so load changes on a shared machine hit both alike
            for b, (det, bare) in runners.items():
                t = time.perf_counter()
                end_to_end(det, files[i % len(files)])
                t1 = time.perf_counter()
                bare()
                totals[b]["e2e"] += t1 - t
                totals[b]["fwd"] += time.perf_counter() - t1

    tta = ", end to end with flip TTA" if args.tta else ""
    print(f"{name}, input {tuple(tensor.shape[-2:])}, {args.threads} thread(s), {args.n} fields{tta}")
    result: dict[str, object] = {"detector": name, "threads": args.threads, "tta": args.tta}
    for b, tot in totals.items():
        e2e, fwd = tot["e2e"] / args.n * 1000, tot["fwd"] / args.n * 1000
        print(f"[{b:5s}] end to end (decode -> resize -> detect -> NMS -> boxes): {e2e:7.1f} ms / 640x480 field")
        print(f"[{b:5s}] bare forward pass:                                       {fwd:7.1f} ms")
        print(f"[{b:5s}] ratio: {e2e / fwd:.2f}")
        result[b] = {"end_to_end_ms": round(e2e, 1), "forward_ms": round(fwd, 1), "ratio": round(e2e / fwd, 3)}
    if len(totals) == 2:
        r_e2e = totals["onnx"]["e2e"] / totals["torch"]["e2e"]
        r_fwd = totals["onnx"]["fwd"] / totals["torch"]["fwd"]
        print(f"onnx / torch: end to end {r_e2e:.2f}, bare forward {r_fwd:.2f}")
        result["onnx_over_torch"] = {"end_to_end": round(r_e2e, 3), "forward": round(r_fwd, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
