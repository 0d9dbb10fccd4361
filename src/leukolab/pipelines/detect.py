"""Detect cells in smear fields: synthetic smears, box statistics, train, evaluate, predict.

Training goes through the shared run lifecycle (:mod:`leukolab.pipelines.lifecycle`)
with the packaged defaults ``configs/detect.yaml``: this module supplies the
train/val split of the fields, the detector (by name from
:data:`~leukolab.registry.DETECTORS`), the detection objective (scored by COCO
evaluation) and the loaders. Evaluation and prediction apply a run's ``best.pt``
to whole fields through :func:`leukolab.models.detection_infer.predict_field`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

import leukolab.objectives  # noqa: F401 - registers the built-in objectives
from leukolab.checkpoints import load_run_state
from leukolab.config import load_defaults
from leukolab.data.checks import require_readable
from leukolab.data.dataset import load_rgb
from leukolab.data.detection import (
    DetectionData,
    DetectionDataset,
    detection_collate,
    is_detection_layout,
    read_detection,
)
from leukolab.data.detection.transforms import (
    Mosaic,
    detection_eval_transform,
    detection_train_post,
    detection_train_transform,
)
from leukolab.data.splits import stratified_split
from leukolab.errors import LeukolabError
from leukolab.evaluation.detection import (
    GroundTruth,
    Prediction,
    coco_metrics,
    draw_boxes,
    plot_pr_curve,
    save_comparison,
)
from leukolab.evaluation.metrics import write_metrics
from leukolab.evaluation.tables import write_table
from leukolab.models import detection as _detectors  # noqa: F401 - registers the detectors
from leukolab.models.backbones import resolve_backbone_name
from leukolab.models.detection import Detector
from leukolab.models.detection_infer import (
    AnyDetector,
    FieldPrediction,
    TileSpec,
    check_tiles,
    check_tta,
    predict_field,
)
from leukolab.models.detection_onnx import OnnxDetector, check_opset, export_onnx, require_onnxruntime
from leukolab.models.weights import checkpoint_backbone_spec, load_backbone_weights
from leukolab.pipelines.lifecycle import open_run
from leukolab.registry import DETECTORS, OBJECTIVES
from leukolab.training.loaders import build_loader
from leukolab.training.loop import pick_device
from leukolab.utils.files import atomic_folder, write_bytes
from leukolab.utils.runs import unique_child

__all__ = [
    "detection_stats",
    "evaluate_detector",
    "export_detector",
    "is_detection_layout",
    "load_backend",
    "load_detector",
    "predict_detector",
    "synth_smears",
    "train_detector",
]


def _warn(line: str | None, root: Path) -> None:
    if line:
        print(f"warning: {root}: {line}", file=sys.stderr)


# --------------------------------------------------------------------------- data
def synth_smears(
    out: Path | str, n: int, width: int = 640, height: int = 480, seed: int = 0, difficulty: float = 0.5,
    scale: float = 1.0, progress: bool = True,
) -> Path:
    """Write synthetic smear fields with VOC, COCO and YOLO boxes (see ``make_smears`` in ``data.synthetic``)."""
    from leukolab.data.synthetic.smears import make_smears

    return make_smears(out, n, width=width, height=height, seed=seed, difficulty=difficulty, scale=scale,
                       progress=progress)


def detection_stats(path: Path | str, format: str = "auto") -> pd.DataFrame:
    """Per-class box counts and box sizes (pixels) of a detection data set, one row per class plus ``all``.

    The repairs made while reading (clipped / tiny / duplicated boxes ...) are in ``table.attrs["repairs"]``.
    """
    data = read_detection(path, format)
    rows = []
    n_images = len(data)
    for c in [*data.classes, "all"]:
        boxes = [b for it in data.items for b, lab in zip(it.boxes, it.labels, strict=True) if c in ("all", lab)]
        wh = np.array([(b[2] - b[0], b[3] - b[1]) for b in boxes]).reshape(-1, 2)
        with_class = sum(1 for it in data.items if c == "all" or c in it.labels)
        row: dict[str, Any] = {"class": c, "boxes": len(boxes), "images": with_class,
                               "boxes_per_image": round(len(boxes) / max(1, n_images), 2)}
        for name, col in (("width", 0), ("height", 1)):
            v = wh[:, col] if len(wh) else np.array([np.nan])
            row.update({f"{name}_min": float(np.min(v)), f"{name}_median": float(np.median(v)),
                        f"{name}_max": float(np.max(v))})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("class")
    table.attrs["format"] = data.format
    table.attrs["images"] = n_images
    table.attrs["repairs"] = data.repairs.summary()
    return table


def _strata(data: DetectionData) -> list[str]:
    """Per image: the classes it holds (``'platelets+rbc+wbc'``), rare combinations pooled."""
    keys = ["+".join(sorted(set(it.labels))) or "empty" for it in data.items]
    counts = pd.Series(keys).value_counts()
    return [k if counts[k] >= 3 else "other" for k in keys]


def split_fields(data: DetectionData, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train / val image indices: the data's own ``train``/``val`` splits, else stratified by the classes present."""
    if "val" in data.splits:
        train = data.splits.get("train") or sorted(set(range(len(data))) - set(data.splits["val"]))
        return sorted(train), sorted(data.splits["val"])
    pool = data.splits.get("train") or data.splits.get("trainval") or list(range(len(data)))
    sub = data.subset(pool)
    if not 0.0 < val_fraction < 1.0:
        raise LeukolabError(f"val fraction {val_fraction} is outside (0, 1); expected e.g. 0.2")
    if len(sub) < 2:
        raise LeukolabError(f"{data.root}: {len(sub)} annotated image(s); expected at least 2 to split train/val")
    keys = _strata(sub)
    if len(set(keys)) == 1 or min(pd.Series(keys).value_counts()) < 3:
        keys = ["all"] * len(keys)
    idx = stratified_split(keys, val_fraction, 0.0, seed)
    return sorted(pool[i] for i in idx["train"]), sorted(pool[i] for i in idx["val"])


# --------------------------------------------------------------------------- training
def _scorer(gts: list[tuple], preds: list[tuple], classes: list[str]) -> dict[str, Any]:
    m = coco_metrics([GroundTruth(*g) for g in gts], [Prediction(*p) for p in preds], classes)
    return m.to_dict()


def build_detector(cfg: dict[str, Any], classes: Sequence[str]) -> Detector:
    """The detector of a config, with ``model.init``'s backbone loaded when given."""
    m = cfg["model"]
    detector = DETECTORS.build(m["detector"], num_classes=len(classes), img_size=cfg["data"]["img_size"],
                               **(m.get("detector_kwargs") or {}))
    if m.get("init"):
        _load_init(detector, m["init"])
    return detector


def _load_init(detector: Detector, init: str) -> None:
    """Load a leukolab backbone (run folder or checkpoint) into the detector's timm backbone."""
    backbone = detector.timm_backbone()
    if backbone is None:
        raise LeukolabError(f"--init: detector {type(detector).__name__} has no timm backbone to initialise")
    spec = checkpoint_backbone_spec(init)
    if spec is not None and resolve_backbone_name(spec.name) != resolve_backbone_name(str(detector.backbone_name)):
        raise LeukolabError(
            f"--init {init} holds a {spec.name} backbone but the detector's is {detector.backbone_name}; "
            "expected a checkpoint of the same architecture"
        )
    load_backbone_weights(backbone, init)


def _adopt_init(m: dict[str, Any]) -> None:
    """With ``--init`` and the default backbone: take the checkpoint's backbone, its options and its normalisation."""
    spec = checkpoint_backbone_spec(m["init"])
    if spec is None or m["detector"] != "centernet":
        return
    kw = m.setdefault("detector_kwargs", {})
    default = load_defaults("detect")["model"]["detector_kwargs"]["backbone"]
    if kw.get("backbone", default) == default:
        kw["backbone"] = spec.name
    kw["backbone_kwargs"] = {**spec.kwargs, **(kw.get("backbone_kwargs") or {})}
    kw.setdefault("mean", list(spec.mean))
    kw.setdefault("std", list(spec.std))


def _prepare(cfg: dict[str, Any]) -> None:
    d, m = cfg["data"], cfg["model"]
    if not d["path"]:
        raise LeukolabError("no data given; expected a VOC, COCO or YOLO detection folder")
    d["path"] = str(Path(d["path"]).resolve())
    if int(d["img_size"]) < 64 or int(d["img_size"]) % 32:
        raise LeukolabError(f"--img-size {d['img_size']}: expected a multiple of 32, at least 64")
    mosaic = cfg.get("augment", {}).get("mosaic", 0.0)
    if not isinstance(mosaic, (int, float)) or not 0.0 <= float(mosaic) <= 1.0:
        raise LeukolabError(f"--mosaic {mosaic}: expected a probability in [0, 1] (0 = off)")
    DETECTORS.get(m["detector"])  # unknown names fail before anything is read
    if m.get("init"):
        m["init"] = str(Path(m["init"]).resolve())
        _adopt_init(m)


def _field_stats(data: DetectionData) -> dict[str, float]:
    long_sides = [max(it.width, it.height) for it in data.items]
    sides = [max(b[2] - b[0], b[3] - b[1]) for it in data.items for b in it.boxes]
    return {"field_size": float(np.median(long_sides)), "largest_box": float(max(sides, default=0.0))}


def train_detector(
    out: Path | str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | str | None = None,
    name: str | None = None,
) -> Path:
    """Train a detector; returns the run folder (``best.pt`` = best validation mAP50)."""
    run = open_run("detect", out, config_file, overrides, resume, prepare=_prepare, name=name or (
        lambda c: f"{c['model']['detector']}-{c['data']['img_size']}-s{c['seed']}"))
    cfg, d, a = run.cfg, run.cfg["data"], run.cfg["augment"]
    data = read_detection(d["path"], d.get("format", "auto"))
    if not run.resumed:
        _warn(data.repairs.summary(), data.root)
    train_idx, val_idx = split_fields(data, float(d["val_fraction"]), run.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    detector = build_detector(cfg, data.classes)
    objective = OBJECTIVES.build(
        "detection", model=detector, classes=data.classes, detector=cfg["model"]["detector"],
        detector_kwargs=dict(cfg["model"].get("detector_kwargs") or {}), img_size=d["img_size"], scorer=_scorer,
        max_detections=int(cfg["model"].get("max_detections", 100)),
    )
    if d["check_images"] and not run.resumed:
        require_readable([it.image for it in data.items], cfg["train"]["progress"])
    size = int(d["img_size"])
    train_tf = detection_train_transform(size, tuple(a["scale"]), a["flips"], a["rot90"], a["color"], a["hue"],
                                         a.get("stain", 0.0))
    collate = functools.partial(detection_collate, size_divisible=detector.stride)
    kw = dict(num_workers=d["num_workers"], seed=run.seed, collate_fn=collate)
    mosaic = None
    if float(a.get("mosaic", 0.0)) > 0:  # runs made before the option have no key: off
        post = v2.Compose(detection_train_post(a["flips"], a["rot90"], a["color"], a["hue"], a.get("stain", 0.0)))
        mosaic = Mosaic(size, float(a["mosaic"]), tuple(a["scale"]), post)
    train_loader = build_loader(DetectionDataset(train, train_tf, data.classes, mosaic=mosaic), d["batch_size"],
                                train=True, **kw)
    val_loader = build_loader(DetectionDataset(val, detection_eval_transform(size), data.classes), d["batch_size"],
                              train=False, **kw)
    table = pd.DataFrame({"path": [str(it.image) for it in data.items],
                          "boxes": [len(it.boxes) for it in data.items],
                          "split": ["val" if i in set(val_idx) else "train" if i in set(train_idx) else "unused"
                                    for i in range(len(data))]})
    run.fit(objective, train_loader, val_loader, tables={"splits.csv": table}, meta=_field_stats(train))
    return run.dir


# --------------------------------------------------------------------------- loading and applying a run
def load_detector(run: Path | str, device: torch.device | None = None) -> tuple[Detector, dict[str, Any]]:
    """The trained detector of a run folder or checkpoint (``best.pt``, weights only) and its checkpoint entries."""
    if Path(run).suffix.lower() == ".onnx":
        raise LeukolabError(f"{run} is an ONNX file; expected the leukolab detect train run folder (--backend onnx "
                            "runs that run's network in ONNX Runtime itself)")
    state = load_run_state(run, "detection", "detect train")
    classes = list(state["classes"])
    detector = DETECTORS.build(state["detector"], num_classes=len(classes), img_size=state["img_size"],
                               **dict(state.get("detector_kwargs") or {}))
    weights = {k[len("model."):]: v for k, v in state["objective"].items() if k.startswith("model.")}
    detector.load_state_dict(weights)
    device = device or pick_device((state.get("config") or {}).get("train", {}).get("device", "auto"))
    meta = {k: state.get(k) for k in ("classes", "detector", "detector_kwargs", "img_size", "field_size",
                                      "largest_box", "config", "epoch")}
    return detector.to(device).eval(), meta


BACKENDS = ("torch", "onnx")


def load_backend(run: Path | str, backend: str = "torch") -> tuple[AnyDetector, dict[str, Any]]:
    """A run's detector for inference: the torch model, or (``backend="onnx"``) its network in ONNX Runtime.

    The ONNX model is exported in memory from the run's weights (well under a second; nothing is
    written); ``leukolab detect export`` writes it to a file for use elsewhere.
    """
    if backend not in BACKENDS:
        raise LeukolabError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return load_detector(run)
    require_onnxruntime()  # before loading anything: the missing extra is the likelier problem
    detector, meta = load_detector(run, torch.device("cpu"))
    return OnnxDetector(detector), meta


def export_detector(run: Path | str, out: Path | str, opset: int = 17) -> Path:
    """Write a run's centernet network as an ONNX file ``out`` (a new file; uint8 NCHW input ``images``).

    Outputs ``heatmap`` (B, K, H/4, W/4) logits and ``distances`` (B, 4, H/4, W/4) in input pixels;
    the model's ``metadata_props`` hold the classes, ``img_size``, ``field_size`` and the strides.
    """
    out = Path(out)
    if out.exists():
        raise LeukolabError(f"{out} exists; expected a new file name (results are never overwritten)")
    if out.suffix.lower() != ".onnx":
        raise LeukolabError(f"--out {out}: expected a new file name ending in .onnx")
    check_opset(opset)  # before the run is loaded
    detector, meta = load_detector(run, torch.device("cpu"))
    size = int(meta["img_size"])
    hw = (-(-size * 3 // 4 // detector.stride) * detector.stride, size)
    data = export_onnx(detector, hw, opset, metadata={
        "classes": list(meta["classes"]), "img_size": size, "field_size": meta.get("field_size"),
        "largest_box": meta.get("largest_box"), "detector": meta["detector"], "run": str(Path(run).resolve()),
    })
    return write_bytes(out, data)


def _tiles(meta: dict[str, Any], tile_size: int | None, overlap: int | None) -> TileSpec:
    largest = float(meta.get("largest_box") or 0.0)
    size = int(tile_size or meta.get("field_size") or meta["img_size"])
    ov = int(overlap if overlap is not None else min(size - 1, np.ceil(largest * 1.1)))
    tile = TileSpec(size, ov)
    check_tiles(tile, largest)
    return tile


def _scale(meta: dict[str, Any], image: np.ndarray, tile: TileSpec | None) -> float:
    """Network pixels per image pixel: the training scale with tiles, else the whole image fitted to img_size."""
    if tile is not None:
        return float(meta["img_size"]) / float(meta.get("field_size") or meta["img_size"])
    return float(meta["img_size"]) / max(image.shape[:2])


def _thresholds(classes: list[str], score: float, class_scores: dict[str, float] | None) -> np.ndarray:
    thr = np.full(len(classes), float(score))
    for name, value in (class_scores or {}).items():
        key = " ".join(name.split()).lower()
        if key not in classes:
            raise LeukolabError(f"--class-score {name}: unknown class; expected one of {', '.join(classes)}")
        thr[classes.index(key)] = float(value)
    return thr


def evaluate_detector(
    run: Path | str, data: Path | str | None = None, out: Path | str | None = None, score: float = 0.3,
    class_scores: dict[str, float] | None = None, tile: bool = False, examples: int = 4, backend: str = "torch",
    tta: bool = False,
) -> Path:
    """COCO-style evaluation of a run on ``data`` (default: the run's validation fields); returns the folder.

    Writes ``metrics.json`` (``ap50``, ``ap50_95`` per class, ``map50``, ``map50_95``,
    precision / recall / counts at ``score``), ``pr_<class>.png`` and ``examples/*.png``
    (ground truth left, predictions right) into a new folder (``RUN/eval``, ``RUN/eval-2`` ...).
    ``backend``: ``torch`` or ``onnx`` (ONNX Runtime, the ``onnx`` extra; see :func:`load_backend`).
    ``tta``: average the four flips of every field (centernet runs; 4x the network time).
    """
    run = Path(run)
    detector, meta = load_backend(run, backend)
    if tta:
        check_tta(detector)
    classes = meta["classes"]
    if data is None:
        test, where = _val_fields(run, meta), "validation fields of the run (used to pick best.pt)"
    else:
        test, where = read_detection(data), str(data)
        _warn(test.repairs.summary(), test.root)
        extra = sorted(set(test.classes) - set(classes))
        if extra:
            raise LeukolabError(
                f"{data}: classes {', '.join(test.classes)} differ from the model's ({', '.join(classes)}); "
                f"{extra[0]!r} is unknown to it"
            )
    tiles = _tiles(meta, None, None) if tile else None
    thr = _thresholds(classes, score, class_scores)
    gts, preds, images = [], [], []
    for item in test.items:
        image = np.asarray(load_rgb(item.image))
        pred = predict_field(detector, image, _scale(meta, image, tiles), 0.01, tiles, tta=tta)
        gts.append(GroundTruth(item.boxes, np.array([classes.index(c) for c in item.labels], dtype=np.int64)))
        preds.append(Prediction(pred.boxes, pred.scores, pred.labels))
        if len(images) < examples:
            images.append(image)
    m = coco_metrics(gts, preds, classes, thr if class_scores else score)
    out_dir = unique_child(run if run.is_dir() else run.parent, "eval") if out is None else unique_child(
        Path(out).parent, Path(out).name)
    write_metrics({**m.to_dict(), "data": where, "run": str(run), "tiled": bool(tile), "backend": backend,
                   "tta": bool(tta)},
                  out_dir / "metrics.json", "COCO-style detection metrics")
    for c, curve in m.pr_curves.items():
        plot_pr_curve(curve, out_dir / f"pr_{c.replace(' ', '_')}.png", f"{c}: precision-recall (IoU 0.5)", m.ap50[c])
    for i, image in enumerate(images):
        kept = preds[i].scores >= thr[preds[i].labels] if len(preds[i].labels) else np.zeros(0, dtype=bool)
        shown = Prediction(preds[i].boxes[kept], preds[i].scores[kept], preds[i].labels[kept])
        save_comparison(image, gts[i], shown, classes, out_dir / "examples" / f"{test.items[i].image.stem}.png")
    return out_dir


def _val_fields(run: Path, meta: dict[str, Any]) -> DetectionData:
    splits_csv = (run if run.is_dir() else run.parent) / "splits.csv"
    cfg = meta.get("config") or {}
    if not splits_csv.is_file() or not cfg.get("data", {}).get("path"):
        raise LeukolabError(f"{run}: no splits.csv; pass --data TEST_DIR")
    val = set(pd.read_csv(splits_csv).query("split == 'val'")["path"].astype(str))
    data = read_detection(cfg["data"]["path"], cfg["data"].get("format", "auto"))
    idx = [i for i, it in enumerate(data.items) if str(it.image) in val]
    if not idx:
        raise LeukolabError(f"{run}: its validation fields are gone from {cfg['data']['path']}; pass --data TEST_DIR")
    return data.subset(idx)


def predict_detector(
    run: Path | str, inputs: Sequence[Path | str], out: Path | str, score: float = 0.3,
    class_scores: dict[str, float] | None = None, tile: bool = False, tile_size: int | None = None,
    overlap: int | None = None, draw: bool = True, backend: str = "torch", tta: bool = False,
) -> Path:
    """Detect cells in image files / folders; writes a new folder ``out`` and returns it.

    ``out`` holds ``boxes.csv`` (image, class, score, x1, y1, x2, y2), ``results.json``
    (COCO results: image_id, category_id, bbox, score; ids in ``images.json``), ``counts.csv``
    (cells of each class per image) and ``annotated/<image>.png``. ``backend``: ``torch`` or
    ``onnx`` (ONNX Runtime, the ``onnx`` extra; same boxes up to float rounding, see :func:`load_backend`).
    ``tta``: average the four flips of every field or tile (centernet runs; 4x the network time).
    """
    from leukolab.data.readers import expand_image_inputs

    detector, meta = load_backend(run, backend)
    if tta:
        check_tta(detector)
    classes = meta["classes"]
    paths = expand_image_inputs(inputs)
    require_readable(paths, show_progress=False)
    thr = _thresholds(classes, score, class_scores)
    tiles = _tiles(meta, tile_size, overlap) if tile else None
    if tile_size is not None and not tile:
        raise LeukolabError("--tile-size needs --tile")

    def fill(root: Path) -> None:
        rows, results, images, counts = [], [], [], []
        for i, path in enumerate(paths):
            image = np.asarray(load_rgb(path))
            field = float(meta.get("field_size") or meta["img_size"])
            if tiles is None and max(image.shape[:2]) > 1.5 * field:
                _warn(f"{max(image.shape[:2])} px is {max(image.shape[:2]) / field:.1f}x the training fields "
                      f"({field:.0f} px): cells shrink below their trained size; use --tile", path)
            pred: FieldPrediction = predict_field(detector, image, _scale(meta, image, tiles), thr, tiles, tta=tta)
            images.append({"id": i + 1, "file_name": str(path), "width": image.shape[1], "height": image.shape[0]})
            for box, s, lab in zip(pred.boxes, pred.scores, pred.labels, strict=True):
                x1, y1, x2, y2 = (round(float(v), 1) for v in box)
                rows.append((str(path), classes[lab], round(float(s), 4), x1, y1, x2, y2))
                results.append({"image_id": i + 1, "category_id": int(lab) + 1, "score": round(float(s), 4),
                                "bbox": [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)]})
            counts.append({"image": str(path), **{c: int((pred.labels == k).sum()) for k, c in enumerate(classes)}})
            if draw:
                (root / "annotated").mkdir(exist_ok=True)
                name = f"{i:05d}_{path.stem}.png" if len({p.stem for p in paths}) < len(paths) else f"{path.stem}.png"
                draw_boxes(image, pred.boxes, pred.labels, classes, pred.scores).save(root / "annotated" / name)
        pd.DataFrame(rows, columns=["image", "class", "score", "x1", "y1", "x2", "y2"]).to_csv(
            root / "boxes.csv", index=False)
        pd.DataFrame(counts).to_csv(root / "counts.csv", index=False)
        (root / "results.json").write_text(json.dumps(results) + "\n", encoding="utf-8")
        cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
        (root / "images.json").write_text(json.dumps({"images": images, "categories": cats}, indent=1) + "\n",
                                          encoding="utf-8")

    return atomic_folder(out, fill)


def summary_line(metrics_path: Path | str) -> str:
    """A one-line summary of a detection ``metrics.json``."""
    m = json.loads(Path(metrics_path).read_text())
    per_class = ", ".join(f"{c} {v:.3f}" for c, v in m["ap50"].items() if v is not None)
    return f"mAP50 {m['map50']:.3f} | mAP50:95 {m['map50_95']:.3f} | AP50: {per_class}"


def write_stats(table: pd.DataFrame, path: Path | str) -> Path:
    """Write a :func:`detection_stats` table as CSV (a new file)."""
    return write_table(table.reset_index(), path, "detection box statistics")
