"""``leukolab serve``'s work, without the web framework: runs, checked uploads, shared models, analyses as JSON.

The web app (:mod:`leukolab.pipelines.serve_app`) only moves bytes; everything a page or an API client sees is
computed here with the functions of ``leukolab smear analyse``: the detector and classifiers load with
:func:`~leukolab.pipelines.smear.load_smear_detector` / :func:`~leukolab.pipelines.smear.load_classifiers`, each
field goes through :meth:`~leukolab.pipelines.smear.SmearAnalyser.analyse_image` (the very code ``analyse_smears``
runs on each file), and the files of the downloadable zip are written by ``smear analyse``'s own writer
(:func:`~leukolab.pipelines.smear.write_outputs`: ``cells.csv``, ``differential.csv``, ``differential.png``,
``summary.json``) plus ``annotated/<image>.png``.

Uploads are checked before any model sees them (:func:`check_upload`: byte size, format, pixel count from the
header, PIL's decompression-bomb guard, ``verify()`` and a full decode), written under a fresh temporary folder
with generated names (``0000.png`` ...; the client's file name is only a label), and the folder is deleted when
the analysis ends unless ``keep`` is asked. Models load once per run path (:class:`ModelCache`, one lock per
key) and are shared read-only by concurrent requests. Nothing under the runs folder is written.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from leukolab.errors import LeukolabError
from leukolab.pipelines.serve_runs import RunInfo, discover_runs

__all__ = ["ModelCache", "RunInfo", "ServeLimits", "ServeOptions", "UploadError", "check_upload", "discover_runs",
           "require_serve_dependencies", "safe_name"]

INSTALL_HINT = "pip install 'leukolab[serve]'"

#: PIL formats accepted, and the suffix of the stored copy
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
MODES = ("fields", "cells")
THUMB = 72  # thumbnail side (px) of a cell in the page's table


class UploadError(LeukolabError):
    """An upload or request the server refuses: a one-line message and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServeLimits:
    """Per request: ``max_files`` files of at most ``max_file_mb`` MB and ``max_pixels`` pixels each, and at
    most ``max_request_mb`` MB of request body in all."""

    max_file_mb: float = 25.0
    max_request_mb: float = 200.0
    max_pixels: int = 40_000_000
    max_files: int = 64


@dataclass
class ServeOptions:
    """``leukolab serve``'s settings: ``runs`` (folder searched for runs), default ``detector`` and
    ``classifiers`` (run folders; listed too when outside ``runs``), where to listen, the torch ``device``,
    ``work_dir`` (parent of the temporary request folders; default: the system's) and the upload limits."""

    runs: Path
    detector: Path | None = None
    classifiers: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    work_dir: Path | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)


def require_serve_dependencies() -> None:
    """A one-line :class:`LeukolabError` naming what to install when FastAPI, uvicorn or python-multipart is
    missing (they are the optional ``serve`` extra)."""
    missing = []
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise LeukolabError(f"leukolab serve needs {', '.join(missing)} (not installed); install with: {INSTALL_HINT}")


# --------------------------------------------------------------------------- uploads
def safe_name(name: str | None, index: int) -> str:
    """A label for an uploaded file: its base name with characters outside ``[A-Za-z0-9._-]`` replaced (never
    used as a path on the server's disk), or ``upload_<index>``."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", (name or "").replace("\\", "/").rsplit("/", 1)[-1])[:100].strip("._")
    return base or f"upload_{index}"


def check_upload(name: str, data: bytes, limits: ServeLimits) -> str:
    """Check one uploaded file before any model sees it; returns the suffix of its format (``.png`` ...).

    Raises :class:`UploadError` (413: too many bytes or pixels, decompression bomb; 415: not an image or an
    unsupported format; 422: empty, corrupt or truncated).
    """
    if not data:
        raise UploadError(f"{name}: empty file; expected a PNG, JPEG, TIFF or BMP image", 422)
    if len(data) > limits.max_file_mb * 1e6:
        raise UploadError(f"{name}: {len(data) / 1e6:.1f} MB; expected at most {limits.max_file_mb:g} MB per file",
                          413)
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
            if fmt not in FORMATS:
                raise UploadError(f"{name}: a {fmt} image; expected PNG, JPEG, TIFF or BMP", 415)
            if w * h > limits.max_pixels:
                raise UploadError(f"{name}: {w} x {h} = {w * h / 1e6:.1f} Mpx; expected at most "
                                  f"{limits.max_pixels / 1e6:g} Mpx per image", 413)
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated or corrupt pixel data fails here
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"{name}: too many pixels for its file size (a decompression bomb?); refused", 413) from None
    except UnidentifiedImageError:
        raise UploadError(f"{name}: not an image; expected a PNG, JPEG, TIFF or BMP file", 415) from None
    except Exception as exc:
        raise UploadError(f"{name}: corrupt or truncated image ({exc.__class__.__name__}); expected a complete "
                          "PNG, JPEG, TIFF or BMP file", 422) from None
    return FORMATS[fmt]


@dataclass
class Batch:
    """Checked uploads stored under ``folder`` (``uploads/0000.png`` ...) with their display ``names``."""

    folder: Path
    paths: list[Path]
    names: list[str]
    keep: bool = False

    def cleanup(self) -> None:
        """Delete the request folder unless the user asked to keep it."""
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)


def store_uploads(files: Sequence[tuple[str | None, bytes]], limits: ServeLimits, work_dir: Path | None,
                  keep: bool = False) -> Batch:
    """Check every upload (:func:`check_upload`), then write them under a new temporary folder."""
    if not files:
        raise UploadError("no file uploaded; expected one or more PNG, JPEG, TIFF or BMP images in 'files'", 422)
    if len(files) > limits.max_files:
        raise UploadError(f"{len(files)} files; expected at most {limits.max_files} per request", 413)
    labels = [safe_name(n, i) for i, (n, _) in enumerate(files)]
    suffixes = [check_upload(label, data, limits) for label, (_, data) in zip(labels, files, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{i:04d}_{label}" for i, label in enumerate(labels)]
    folder = Path(tempfile.mkdtemp(prefix="leukolab-serve-", dir=work_dir))
    (folder / "uploads").mkdir()
    paths = []
    for i, ((_, data), suffix) in enumerate(zip(files, suffixes, strict=True)):
        paths.append(folder / "uploads" / f"{i:04d}{suffix}")
        paths[-1].write_bytes(data)
    return Batch(folder, paths, labels, keep)


# --------------------------------------------------------------------------- models
class ModelCache:
    """Models loaded once per key and shared: the first caller of a key loads it under that key's lock, the
    others wait for it; :attr:`loads` counts the loads (for tests and ``/api/health``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Any, threading.Lock] = {}
        self._models: dict[Any, Any] = {}
        self.loads = 0

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        """The model of ``key``, loaded with ``load()`` on first use."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._models:
                self._models[key] = load()
                with self._lock:
                    self.loads += 1
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


# --------------------------------------------------------------------------- JSON helpers
def data_url(image: Image.Image | bytes, fmt: str = "PNG") -> str:
    """An ``<img src>`` data URL of a PIL image (or of PNG bytes)."""
    if isinstance(image, bytes):
        raw = image
    else:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
        raw = buf.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode('ascii')}"


def thumbnail(crop: Image.Image, side: int = THUMB) -> str:
    """A JPEG data URL of ``crop`` shrunk to at most ``side`` pixels."""
    im = crop.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    return data_url(im, "JPEG")


def jsonable(value: Any) -> Any:
    """Numbers and NaN of numpy/pandas as JSON values (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def zip_folder(folder: Path) -> bytes:
    """The files under ``folder`` as zip bytes (paths relative to it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


class ResultStore:
    """The zips of the latest results, in memory (at most ``size`` of them), for ``/api/results/<id>.zip``."""

    def __init__(self, size: int = 16) -> None:
        self.size, self._lock, self._items = size, threading.Lock(), {}  # type: ignore[var-annotated]

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._items[key] = (time.time(), data)
            while len(self._items) > self.size:
                del self._items[min(self._items, key=lambda k: self._items[k][0])]

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
        return item[1] if item else None
