"""From smear fields to a differential count: detect white cells, crop, classify, count.

``leukolab smear analyse`` (:func:`analyse_smears`) applies a detector run to
each field (:func:`leukolab.models.detection_infer.predict_field`, as ``detect
predict`` does), keeps the detector's white-cell class, cuts a square with a
margin around each box (:mod:`leukolab.data.crops`), and classifies the crops
with a classifier run, an ensemble folder, or several of them averaged with
equal weights (:func:`leukolab.pipelines.predictors.load_predictor`). Crops the
classifier calls ``background`` are false detections: they are counted, but
not in the differential (:mod:`leukolab.evaluation.differential`).

Under ``torchrun`` every rank analyses its shard of the fields
(:func:`leukolab.training.distributed.shard`), a block at a time; rank 0
gathers the results in input order and writes the same files a single process
writes.

Background crops for ``leukolab train --background DIR`` (``leukolab smear
mine-background``) are :mod:`leukolab.pipelines.smear_background`'s job.

The parts ``analyse_smears`` is made of are public for other front ends
(``leukolab serve``): :func:`load_smear_detector` and :func:`load_classifiers`
load the models, :class:`SmearAnalyser` analyses one field
(:meth:`SmearAnalyser.analyse_image`), and :func:`write_outputs` writes the
result folder from the :class:`FieldResult` list of any :class:`CellAnalyser`.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from leukolab.data.crops import (
    DEFAULT_MARGIN,
    PAD_MODES,
    crop_square,
    field_fill,
    square_around,
    white_cell_class,
)
from leukolab.data.dataset import load_rgb
from leukolab.errors import LeukolabError
from leukolab.evaluation.differential import (
    BACKGROUND,
    TOTAL,
    cell_types,
    differential_table,
    draw_cells,
    match_truth,
    plot_differential,
    truth_table,
)
from leukolab.evaluation.manifest import record
from leukolab.evaluation.metrics import write_metrics
from leukolab.evaluation.tables import write_table
from leukolab.models.detection import Detector
from leukolab.models.detection_infer import TileSpec, predict_field
from leukolab.pipelines.detect import _scale, _tiles, load_detector
from leukolab.pipelines.predictors import EnsemblePredictor, Predictor, load_predictor, same_classes
from leukolab.training import distributed
from leukolab.training.loop import pick_device
from leukolab.utils.files import atomic_folder, write_bytes

__all__ = ["CellAnalyser", "FieldResult", "SmearAnalyser", "SmearOptions", "analyse_smears", "annotated_names",
           "cells_frame", "load_classifiers", "load_smear_detector", "write_outputs"]

#: fields each rank analyses between two merges on rank 0 (bounds the memory of gathered annotated PNGs)
BLOCK = 8
#: annotated fields listed in the report (all of them are written)
REPORTED_FIELDS = 24


@dataclass
class SmearOptions:
    """How ``smear analyse`` turns fields into cells.

    ``score``: detector score threshold of the white-cell class; ``margin``: fraction of the box side added
    on each side of a crop (:data:`~leukolab.data.crops.DEFAULT_MARGIN`); ``pad``: ``reflect`` or ``median``
    where a crop leaves the field; ``tile``: tile fields larger than the detector's training fields;
    ``cell_class``: the detector class to classify (default: its white-cell class); ``tta``: dihedral
    test-time augmentation of the classifiers; ``batch_size``: crops per classifier batch; ``device``:
    ``auto``, ``cpu``, ``cuda`` ...; ``draw``: write ``annotated/``; ``progress``: a progress bar.
    """

    score: float = 0.3
    margin: float = DEFAULT_MARGIN
    pad: str = "reflect"
    tile: bool = False
    cell_class: str | None = None
    tta: bool = False
    batch_size: int = 64
    device: str = "auto"
    draw: bool = True
    progress: bool = True

    def check(self) -> None:
        """One-line errors for values out of range."""
        if not 0.0 <= self.score <= 1.0:
            raise LeukolabError(f"--score {self.score}: expected a detector score in [0, 1]")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise LeukolabError(f"--margin {self.margin}: expected a fraction of the box side >= 0, e.g. 0.5")
        if self.pad not in PAD_MODES:
            raise LeukolabError(f"--pad {self.pad!r}: expected one of {', '.join(PAD_MODES)}")
        if self.batch_size < 1:
            raise LeukolabError(f"--batch-size {self.batch_size}: expected at least 1")


@dataclass
class FieldResult:
    """One analysed field: its cells' ``boxes`` (N, 4), detector ``scores`` (N,) and class ``probs`` (N, K),
    the annotated field as PNG bytes (or None), the seconds it took, or the ``error`` that stopped it."""

    image: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    png: bytes | None = None
    seconds: float = 0.0
    error: str | None = None


# --------------------------------------------------------------------------- models
def load_smear_detector(run: Path | str, device: torch.device) -> tuple[Detector, dict[str, Any]]:
    """The detector of a ``leukolab detect train`` run on ``device`` and its metadata
    (:func:`leukolab.pipelines.detect.load_detector`); a bad run is a one-line ``--detector RUN: ...`` error."""
    try:
        return load_detector(run, device)
    except LeukolabError as exc:
        raise LeukolabError(f"--detector {run}: {exc}") from None


def load_classifiers(paths: Sequence[Path | str], tta: bool = False, device: torch.device | None = None) -> Predictor:
    """One predictor of classifier runs / ensemble folders: their equal-weight mean when several are given."""
    if not paths:
        raise LeukolabError("no --classifier given; expected a leukolab train run or an ensemble folder")
    predictors = []
    for p in paths:
        try:
            predictors.append(load_predictor(p, tta, device))
        except LeukolabError as exc:
            raise LeukolabError(f"--classifier {p}: {exc}") from None
    if len(predictors) == 1:
        return predictors[0]
    names = same_classes([(f"--classifier {p}", pred) for p, pred in zip(paths, predictors, strict=True)])
    weights = np.full(len(predictors), 1.0 / len(predictors))
    return EnsemblePredictor(predictors, weights, names, ", ".join(str(p) for p in paths))


class CellAnalyser(Protocol):
    """What :func:`write_outputs` and ``leukolab serve`` need of an analyser: the classifier's ``classes``,
    the name of the cells it classifies (``cell_name``), its ``options`` and ``predictor``, the crops of boxes
    in an image, and one analysed image. :class:`SmearAnalyser` is one; ``serve``'s single-cell mode another."""

    classes: list[str]
    cell_name: str
    options: SmearOptions
    predictor: Predictor

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> list[Image.Image]:
        """The crops the classifier sees of ``boxes`` (N, 4) in the RGB ``image`` (H, W, 3 uint8)."""
        ...

    def analyse_image(self, name: str, image: np.ndarray) -> FieldResult:
        """Cells, scores and class probabilities of the decoded RGB ``image`` labelled ``name``."""
        ...


class SmearAnalyser:
    """Detect, crop and classify one field at a time: ``detector`` and its ``meta`` (from
    :func:`load_smear_detector`), the classifier ``predictor`` (:func:`load_classifiers`) and ``options``.

    Keeps the detector's white-cell class (``options.cell_class`` or the detected default, :attr:`cell`,
    named :attr:`cell_name`) above ``options.score``; :attr:`classes` are the classifier's classes."""

    def __init__(self, detector: Detector, meta: dict[str, Any], predictor: Predictor, options: SmearOptions):
        self.detector, self.meta, self.predictor, self.options = detector, meta, predictor, options
        classes = list(meta["classes"])
        self.cell = white_cell_class(classes, options.cell_class)
        self.cell_name = classes[self.cell]
        self.thresholds = np.full(len(classes), np.inf)  # other classes are never kept
        self.thresholds[self.cell] = options.score
        self.tiles: TileSpec | None = _tiles(meta, None, None) if options.tile else None
        self.classes = list(predictor.class_names)

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> list[Image.Image]:
        """Square crops around ``boxes`` (N, 4) with ``options.margin``, padded by ``options.pad``."""
        fill = field_fill(image) if self.options.pad == "median" else None
        return [Image.fromarray(crop_square(image, square_around(b, self.options.margin), self.options.pad, fill))
                for b in boxes]

    def field(self, path: Path) -> FieldResult:
        """:meth:`analyse_image` of the image file ``path`` (timed with its decoding); an unreadable file is a
        result with ``error`` set, not an exception."""
        start = time.perf_counter()
        try:
            image = np.asarray(load_rgb(path))
        except LeukolabError as exc:
            return FieldResult(str(path), error=str(exc))
        result = self.analyse_image(str(path), image)
        result.seconds = time.perf_counter() - start
        return result

    def analyse_image(self, name: str, image: np.ndarray) -> FieldResult:
        """Detect, crop and classify one decoded RGB field ``image`` (H, W, 3 uint8) labelled ``name`` (what
        ``smear analyse`` does to each file; ``leukolab serve`` calls it on uploaded fields)."""
        start = time.perf_counter()
        pred = predict_field(self.detector, image, _scale(self.meta, image, self.tiles), self.thresholds, self.tiles)
        pred = pred.keep(pred.labels == self.cell)
        crops = self.crops(image, pred.boxes)
        probs = (self.predictor.predict_images(crops, self.options.batch_size) if crops
                 else np.zeros((0, len(self.classes)), dtype=np.float32))
        png = None
        if self.options.draw:
            top = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
            im = draw_cells(image, pred.boxes, top, self.classes, probs.max(1) if len(probs) else np.zeros(0))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            png = buf.getvalue()
        return FieldResult(name, pred.boxes.astype(np.float64), pred.scores.astype(np.float64),
                           np.asarray(probs, dtype=np.float64), png, time.perf_counter() - start)


# --------------------------------------------------------------------------- analyse
def _out_problem(out: Path, truth: Path | None) -> str | None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"{out} already exists and is not empty; refusing to overwrite it"
    if truth is not None:
        try:
            truth_table(_read_csv(truth))
        except LeukolabError as exc:
            return str(exc)
    return None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise LeukolabError(f"--truth {path}: cannot read it as CSV ({exc.__class__.__name__}); expected a table "
                            "with image, box and type columns") from None


def annotated_names(paths: Sequence[Path]) -> list[str]:
    """The ``annotated/`` file name of each field: ``<stem>.png``, or ``<index>_<stem>.png`` when stems repeat."""
    if len({p.stem for p in paths}) < len(paths):
        return [f"{i:05d}_{p.stem}.png" for i, p in enumerate(paths)]
    return [f"{p.stem}.png" for p in paths]


def cells_frame(results: Sequence[FieldResult], classes: Sequence[str]) -> pd.DataFrame:
    """``cells.csv``: one row per classified cell (image, box, detector score, type, ``p_<class>``)."""
    cols = ["image", "x1", "y1", "x2", "y2", "detector_score", "type", *(f"p_{c}" for c in classes)]
    rows = []
    for r in results:
        for box, s, p in zip(r.boxes, r.scores, r.probs, strict=True):
            rows.append([r.image, *(round(float(v), 1) for v in box), round(float(s), 4), classes[int(np.argmax(p))],
                         *(round(float(v), 4) for v in p)])
    return pd.DataFrame(rows, columns=cols)


def analyse_smears(
    images: Sequence[Path | str], detector: Path | str, classifiers: Sequence[Path | str], out: Path | str,
    options: SmearOptions | None = None, truth: Path | str | None = None,
) -> Path | None:
    """Analyse smear fields (image files and folders); writes the new folder ``out`` and returns it.

    ``out`` holds ``cells.csv`` (one row per classified cell), ``differential.csv`` (counts and percentages
    of each type per image and a ``TOTAL`` row; background crops in their own column), ``differential.png``,
    ``annotated/<image>.png`` (box colour = type, label = type and probability) and ``summary.json``; with
    ``truth`` (a CSV of annotated white cells, see :func:`~leukolab.evaluation.differential.truth_table`)
    also ``truth.json``, ``truth_matches.csv`` and ``truth_fields.csv``
    (:func:`~leukolab.evaluation.differential.match_truth`). Under torchrun each rank analyses a shard of
    the fields and rank 0 writes; the other ranks return ``None``.
    """
    from tqdm.auto import tqdm

    from leukolab.data.readers import expand_image_inputs

    options = options or SmearOptions()
    options.check()
    out, truth = Path(out), (Path(truth) if truth is not None else None)
    distributed.init_distributed(options.device)
    paths = expand_image_inputs(images)
    problem = distributed.broadcast_from_main(lambda: _out_problem(out, truth))
    if problem:
        raise LeukolabError(problem)
    device = pick_device(options.device)
    det, meta = load_smear_detector(detector, device)
    predictor = load_classifiers(list(classifiers), options.tta, device)
    analyser = SmearAnalyser(det, meta, predictor, options)
    names = annotated_names(paths)
    world = distributed.world_size()

    def work(root: Path | None) -> None:
        results: list[FieldResult] = []
        t0 = time.perf_counter()
        bar = tqdm(total=len(paths), desc="smear fields", leave=False, dynamic_ncols=True,
                   disable=not (options.progress and root is not None))
        try:
            for start in range(0, len(paths), BLOCK * world):
                chunk = paths[start:start + BLOCK * world]
                merged = distributed.gather_shards([analyser.field(p) for p in distributed.shard(chunk)], len(chunk))
                error = distributed.broadcast_from_main(
                    lambda m=merged: next((r.error for r in m if r.error), None))  # type: ignore[union-attr]
                if error:
                    raise LeukolabError(error)
                if root is not None and merged is not None:
                    for k, r in enumerate(merged):
                        if r.png is not None:
                            write_bytes(root / "annotated" / names[start + k], r.png)
                            r.png = None
                    results += merged
                bar.update(len(chunk))
        finally:
            bar.close()
        if root is not None:
            write_outputs(root, results, paths, names, analyser, detector, classifiers, world,
                           time.perf_counter() - t0, truth)

    if distributed.is_main():
        return atomic_folder(out, work)
    work(None)
    return None


def write_outputs(
    root: Path, results: list[FieldResult], paths: Sequence[Path], names: Sequence[str], analyser: CellAnalyser,
    detector: Path | str, classifiers: Sequence[Path | str], world: int, wall: float, truth: Path | None,
) -> None:
    """Write ``smear analyse``'s tables into the folder ``root``: ``cells.csv``, ``differential.csv`` and
    ``.png``, ``summary.json`` and, with a ``truth`` CSV, the comparison files (see :func:`analyse_smears`).

    ``results`` of the fields ``paths`` (in order) by ``analyser``; ``names``: their ``annotated/`` file names
    (:func:`annotated_names`; the PNGs themselves are written by the caller); ``detector`` / ``classifiers``:
    labels recorded in the summary; ``world``: processes; ``wall``: seconds the analysis took.
    """
    classes = analyser.classes
    cells = cells_frame(results, classes)
    images = [str(p) for p in paths]
    table = differential_table(cells, images, classes)
    write_table(table, root / "differential.csv", "differential count: cells of each type per field (and TOTAL)")
    plot_differential(table, classes, root / "differential.png")
    write_table(cells, root / "cells.csv", "cells: box, detector score, predicted type and probabilities")
    total = table.loc[table["image"] == TOTAL].iloc[0]
    types = cell_types(classes)
    opts = analyser.options
    summary: dict[str, Any] = {
        "fields": len(paths), "fields_without_cells": int((table["cells"][table["image"] != TOTAL] == 0).sum()),
        "cells": int(total["cells"]), "background": int(total[BACKGROUND]),
        "counts": {t: int(total[t]) for t in types},
        "percent": {t: (None if pd.isna(total[f"{t}_pct"]) else float(total[f"{t}_pct"])) for t in types},
        "detector": str(detector), "classifiers": "; ".join(str(c) for c in classifiers),
        "classes": ", ".join(classes), "cell_class": analyser.cell_name,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "draw")},
        "ms_per_field": round(1000.0 * float(np.mean([r.seconds for r in results])), 1) if results else None,
        "wall_seconds": round(wall, 2), "processes": world,
    }
    write_metrics(summary, root / "summary.json", "smear analysis summary")
    if opts.draw:
        for name in names[:REPORTED_FIELDS]:
            record(root, f"annotated/{name}", "figure", f"annotated field {Path(name).stem}")
    if truth is not None:
        cmp = match_truth(cells, truth_table(_read_csv(truth)), fields=images)
        write_metrics({**cmp.metrics, "truth": str(truth)}, root / "truth.json",
                      "comparison with annotated white cells")
        write_table(cmp.fields, root / "truth_fields.csv", "per field: true vs predicted cells, differential error")
        write_table(cmp.matches, root / "truth_matches.csv", "annotated white cells: found? typed as?")
