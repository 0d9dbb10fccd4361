"""Run folders: every run gets a new one, nothing is ever overwritten.

The file helpers here (:func:`write_new`, :func:`replace_file`, :func:`dump_yaml`,
:func:`dump_json`) are thin wrappers of the one atomic writer, :mod:`leukolab.utils.files`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from leukolab.errors import LeukolabError
from leukolab.utils.files import write_text


def new_run_dir(parent: Path | str, name: str) -> Path:
    """Create and return a fresh folder ``parent/<name>-<timestamp>[-k]``."""
    parent = Path(parent)
    if parent.exists() and not parent.is_dir():
        raise LeukolabError(f"--out {parent} is a file; expected a folder to hold run folders")
    parent.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        candidate = parent / (f"{stem}-{stamp}" + (f"-{k}" if k else ""))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise LeukolabError(f"could not create a new run folder in {parent}")


def unique_child(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3`` ... if taken; created empty."""
    for k in range(1, 10000):
        candidate = parent / (name if k == 1 else f"{name}-{k}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise LeukolabError(f"could not create a new folder {name} in {parent}")


def write_new(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, refusing to replace an existing file (see :mod:`leukolab.utils.files`)."""
    return write_text(path, text)


def replace_file(path: Path | str, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (a reader sees the old or the new file, never half of one)."""
    return write_text(path, text, overwrite=True)


def dump_yaml(data: dict[str, Any], path: Path | str) -> Path:
    """Write ``data`` as YAML (a new file, atomically)."""
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def dump_json(data: Any, path: Path | str) -> Path:
    """Write ``data`` as indented JSON (a new file, atomically)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")
