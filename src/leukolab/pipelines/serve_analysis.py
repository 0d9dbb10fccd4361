"""One analysis of ``leukolab serve``: checked uploads in, ``smear analyse``'s results out, as JSON and a zip.

:class:`Service` holds what a server shares between requests: the runs found under the runs folder
(:func:`~leukolab.pipelines.serve_runs.discover_runs`), the loaded models (:class:`~leukolab.pipelines.serve.
ModelCache`), the zips of recent results and the background jobs whose progress the page polls. Each field
is analysed by :meth:`leukolab.pipelines.smear.SmearAnalyser.analyse_image` (``mode="fields"``), or classified
whole as one cell (``mode="cells"``: single-cell crops, no detector); the result folder is written by
``smear analyse``'s writer (:func:`~leukolab.pipelines.smear.write_outputs`), so ``differential.csv`` here and
there are the same function of the same cells.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from leukolab.data.dataset import load_rgb
from leukolab.errors import LeukolabError
from leukolab.evaluation.detection import PALETTE
from leukolab.evaluation.differential import TOTAL, cell_types, differential_table, draw_cells
from leukolab.pipelines.predictors import Predictor
from leukolab.pipelines.serve import (
    MODES,
    Batch,
    ModelCache,
    ResultStore,
    ServeOptions,
    UploadError,
    data_url,
    jsonable,
    thumbnail,
    zip_folder,
)
from leukolab.pipelines.serve_runs import RunInfo, discover_runs
from leukolab.pipelines.smear import (
    CellAnalyser,
    FieldResult,
    SmearAnalyser,
    SmearOptions,
    annotated_names,
    cells_frame,
    load_classifiers,
    load_smear_detector,
    write_outputs,
)
from leukolab.training.loop import pick_device
from leukolab.utils.files import atomic_folder, write_bytes

__all__ = ["Choice", "Job", "Service"]

#: analyses waiting or running at most (more: 429)
MAX_PENDING = 8
#: finished jobs are forgotten after this many seconds
JOB_TTL = 900.0
ATTENTION_SIDE = 160


@dataclass
class Choice:
    """What a request asks for: run ids (from ``/api/runs``; None / empty: the server's defaults), ``mode``
    (``fields``: smear fields through the detector; ``cells``: each image is one cell), the detector
    ``score`` threshold, dihedral ``tta``, ViT ``attention`` maps, ``keep`` the request folder, and whether
    to embed ``images`` (annotated fields, thumbnails) in the JSON."""

    detector: str | None = None
    classifiers: list[str] = field(default_factory=list)
    mode: str = "fields"
    score: float = 0.3
    tta: bool = False
    attention: bool = False
    keep: bool = False
    images: bool = True


class _CellsAnalyser:
    """Single-cell crops: each image is one cell whose box is the whole image (no detector, no score); a
    :class:`~leukolab.pipelines.smear.CellAnalyser`."""

    cell_name = "whole image (single-cell crops)"

    def __init__(self, predictor: Predictor, options: SmearOptions) -> None:
        self.predictor, self.options, self.classes = predictor, options, list(predictor.class_names)

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> list[Image.Image]:
        return [Image.fromarray(image) for _ in boxes]

    def analyse_image(self, name: str, image: np.ndarray) -> FieldResult:
        start = time.perf_counter()
        probs = np.asarray(self.predictor.predict_images([Image.fromarray(image)], self.options.batch_size),
                           dtype=np.float64)
        boxes = np.array([[0.0, 0.0, image.shape[1], image.shape[0]]])
        buf = io.BytesIO()
        draw_cells(image, boxes, probs.argmax(1), self.classes, probs.max(1)).save(buf, format="PNG")
        return FieldResult(name, boxes, np.full(1, np.nan), probs, buf.getvalue(), time.perf_counter() - start)


def _attention(predictor: Predictor, crops: Sequence[Image.Image]) -> list[str] | None:
    """Class-token attention of the last block (mean over heads) over each crop, for a single ViT run."""
    import matplotlib

    from leukolab.evaluation.attention import attention_maps
    from leukolab.models.backbones import is_vit

    backbone = getattr(getattr(predictor, "model", None), "backbone", None)
    if backbone is None or not is_vit(backbone) or not crops:
        return None
    x = predictor.tensors(crops).to(predictor.device)  # type: ignore[attr-defined]
    with torch.no_grad():
        maps = attention_maps(backbone, x)[:, 0].mean(1).float().cpu().numpy()
    out = []
    for crop, m in zip(crops, maps, strict=True):
        base = crop.convert("RGB").resize((ATTENTION_SIDE, ATTENTION_SIDE), Image.Resampling.BILINEAR)
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        heat = Image.fromarray(m.astype(np.float32), mode="F").resize(base.size, Image.Resampling.BILINEAR)
        rgb = (matplotlib.colormaps["inferno"](np.asarray(heat).clip(0, 1))[..., :3] * 255).astype(np.uint8)
        out.append(data_url(Image.blend(base, Image.fromarray(rgb), 0.55), "JPEG"))
    return out


@dataclass
class Job:
    """A background analysis: ``state`` queued / running / done / error, ``done`` of ``total`` files."""

    id: str
    total: int
    done: int = 0
    state: str = "queued"
    result: dict[str, Any] | None = None
    error: str | None = None
    status: int = 200
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.id, "state": self.state, "done": self.done, "total": self.total}
        if self.state == "done":
            out["result"] = self.result
        if self.state == "error":
            out.update(error=self.error, status=self.status)
        return out


class Service:
    """The state a server shares between requests (see the module docstring)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.runs_root = Path(options.runs).resolve()
        extra = [p for p in (options.detector, *options.classifiers) if p is not None]
        self.runs: list[RunInfo] = discover_runs(self.runs_root, extra)
        self.by_id = {r.id: r for r in self.runs}
        by_path = {r.path: r.id for r in self.runs}
        self.default_detector = (by_path[Path(options.detector).resolve()] if options.detector is not None
                                 else next((r.id for r in self.runs if r.kind == "detector"), None))
        self.default_classifiers = ([by_path[Path(p).resolve()] for p in options.classifiers] if options.classifiers
                                    else [r.id for r in self.runs if r.kind != "detector"][:1])
        work = Path(options.work_dir).resolve() if options.work_dir is not None else None
        if work is not None and (work == self.runs_root or self.runs_root in work.parents):
            raise LeukolabError(f"--work-dir {work}: inside --runs {self.runs_root}; nothing may be written there")
        self.work_dir = work
        self.device = pick_device(options.device)
        self.models = ModelCache()
        self.results = ResultStore()
        self.jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="leukolab-serve")

    # ----------------------------------------------------------------- runs
    def runs_json(self) -> dict[str, Any]:
        """``/api/runs``: every run, and the defaults the page preselects."""
        return {"root": str(self.runs_root), "runs": [r.to_json() for r in self.runs],
                "default_detector": self.default_detector, "default_classifiers": self.default_classifiers}

    def _run(self, rid: str, kinds: tuple[str, ...], what: str) -> RunInfo:
        run = self.by_id.get(rid)
        if run is None:
            raise UploadError(f"{what} {rid!r}: not a run listed by /api/runs", 404)
        if run.kind not in kinds:
            raise UploadError(f"{what} {rid!r} is a {run.kind}; expected a {' or '.join(kinds)}", 422)
        return run

    def resolve(self, choice: Choice) -> tuple[RunInfo | None, list[RunInfo]]:
        """The runs a request uses; 4xx :class:`UploadError` for unknown runs or options out of range."""
        if choice.mode not in MODES:
            raise UploadError(f"mode {choice.mode!r}: expected one of {', '.join(MODES)}", 422)
        try:
            SmearOptions(score=choice.score).check()
        except LeukolabError as exc:
            raise UploadError(str(exc).replace("--score", "score"), 422) from None
        cls_ids = list(choice.classifiers) or self.default_classifiers
        if not cls_ids:
            raise UploadError("no classifier chosen and none found under the runs folder", 422)
        classifiers = [self._run(c, ("classifier", "ensemble"), "classifier") for c in cls_ids]
        detector = None
        if choice.mode == "fields":
            det_id = choice.detector or self.default_detector
            if det_id is None:
                raise UploadError("no detector chosen and none found under the runs folder; use mode 'cells' for "
                                  "single-cell crops", 422)
            detector = self._run(det_id, ("detector",), "detector")
        return detector, classifiers

    # ----------------------------------------------------------------- analysis
    def _models(self, detector: RunInfo | None, classifiers: list[RunInfo], choice: Choice) -> CellAnalyser:
        paths = [r.path for r in classifiers]
        predictor = self.models.get(("classifiers", tuple(map(str, paths)), choice.tta),
                                    lambda: load_classifiers(paths, choice.tta, self.device))
        options = SmearOptions(score=choice.score, tta=choice.tta, device=str(self.device), progress=False)
        if detector is None:
            return _CellsAnalyser(predictor, options)
        det, meta = self.models.get(("detector", str(detector.path)), lambda: load_smear_detector(detector.path,
                                                                                                     self.device))
        return SmearAnalyser(det, meta, predictor, options)

    def analyse(self, batch: Batch, choice: Choice,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Analyse the stored uploads of ``batch`` (then delete its folder unless ``keep``); the result JSON."""
        try:
            return self._analyse(batch, choice, progress)
        finally:
            batch.cleanup()

    def _analyse(self, batch: Batch, choice: Choice, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
        detector, classifiers = self.resolve(choice)
        t0 = time.perf_counter()
        analyser = self._models(detector, classifiers, choice)
        classes = list(analyser.classes)
        results: list[FieldResult] = []
        fields: list[dict[str, Any]] = []
        for i, (path, name) in enumerate(zip(batch.paths, batch.names, strict=True)):
            image = np.asarray(load_rgb(path))
            r = analyser.analyse_image(name, image)
            results.append(r)
            fields.append(self._field_json(r, image, analyser.crops(image, r.boxes), classes, choice,
                                           analyser.predictor))
            if progress is not None:
                progress(i + 1, len(batch.paths))
        annotated = annotated_names([Path(n) for n in batch.names])
        det_label = str(detector.path) if detector is not None else "none (single-cell crops)"
        cls_labels = [str(r.path) for r in classifiers]

        def fill(root: Path) -> None:
            for r, a in zip(results, annotated, strict=True):
                if r.png is not None:
                    write_bytes(root / "annotated" / a, r.png)
            write_outputs(root, results, [Path(n) for n in batch.names], annotated, analyser, det_label,
                           cls_labels, 1, time.perf_counter() - t0, None)

        out = atomic_folder(batch.folder / "results", fill)
        table = differential_table(cells_frame(results, classes), batch.names, classes)
        rows = jsonable(table.to_dict("records"))
        for f, row in zip(fields, rows, strict=False):
            f["differential"] = row
        rid = secrets.token_urlsafe(12)
        self.results.put(rid, zip_folder(out))
        result: dict[str, Any] = {
            "id": rid, "zip": f"/api/results/{rid}.zip", "mode": choice.mode,
            "detector": detector.id if detector is not None else None, "classifiers": [r.id for r in classifiers],
            "classes": classes, "types": cell_types(classes), "cell_class": analyser.cell_name,
            "colours": {c: "#{:02x}{:02x}{:02x}".format(*PALETTE[k % len(PALETTE)]) for k, c in enumerate(classes)},
            "fields": fields, "differential": rows, "total": rows[-1] if rows and rows[-1]["image"] == TOTAL else None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if batch.keep:
            result["kept"] = str(batch.folder)
        return result

    @staticmethod
    def _field_json(r: FieldResult, image: np.ndarray, crops: list[Image.Image], classes: list[str], choice: Choice,
                    predictor: Predictor) -> dict[str, Any]:
        maps = _attention(predictor, crops) if choice.attention and choice.images else None
        cells = []
        for k, (box, score, probs) in enumerate(zip(r.boxes, r.scores, r.probs, strict=True)):
            top = int(np.argmax(probs))
            cell: dict[str, Any] = {"index": k, "box": [round(float(v), 1) for v in box],
                                    "detector_score": jsonable(round(float(score), 4)), "type": classes[top],
                                    "probability": round(float(probs[top]), 4),
                                    "probs": [round(float(p), 4) for p in probs]}
            if choice.images:
                cell["thumbnail"] = thumbnail(crops[k])
            if maps is not None:
                cell["attention"] = maps[k]
            cells.append(cell)
        out: dict[str, Any] = {"name": r.image, "width": int(image.shape[1]), "height": int(image.shape[0]),
                               "cells": cells, "seconds": round(r.seconds, 3)}
        if choice.images and r.png is not None:
            out["annotated"] = data_url(r.png)
        return out

    # ----------------------------------------------------------------- jobs
    def submit(self, batch: Batch, choice: Choice) -> Job:
        """Analyse ``batch`` in the background; poll :meth:`job`."""
        try:
            self.resolve(choice)  # bad choices answer 4xx now, not in the job
        except LeukolabError:
            batch.cleanup()
            raise
        now = time.time()
        with self._jobs_lock:
            for jid in [j.id for j in self.jobs.values() if j.finished is not None and now - j.finished > JOB_TTL]:
                del self.jobs[jid]
            if sum(j.finished is None for j in self.jobs.values()) >= MAX_PENDING:
                batch.cleanup()
                raise UploadError(f"server busy: {MAX_PENDING} analyses waiting or running; try again shortly", 429)
            job = Job(secrets.token_urlsafe(9), len(batch.paths))
            self.jobs[job.id] = job
        self._pool.submit(self._run_job, job, batch, choice)
        return job

    def _run_job(self, job: Job, batch: Batch, choice: Choice) -> None:
        job.state = "running"

        def progress(done: int, _total: int) -> None:
            job.done = done

        try:
            job.result = self.analyse(batch, choice, progress)
            job.state = "done"
        except LeukolabError as exc:
            job.error, job.status, job.state = str(exc), int(getattr(exc, "status", 422)), "error"
        except Exception as exc:  # reported to the page, the server keeps serving
            job.error, job.status, job.state = f"internal error ({exc.__class__.__name__}: {exc})", 500, "error"
        finally:
            job.finished = time.time()

    def job(self, jid: str) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise UploadError(f"job {jid!r}: unknown or expired", 404)
        return job

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
