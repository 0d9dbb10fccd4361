"""The artefact manifest: a small ``artefacts.json`` per output folder listing what was written there.

Every writer in :mod:`leukolab.evaluation` (metrics JSON, tables, figures, the
HTML report) calls :func:`record` after writing a file, so a pipeline that uses
them gets a manifest without extra code. ``leukolab report`` renders a folder
from its manifest (:func:`read_manifest`) instead of guessing from file names.

The file is a JSON object ``{"format": 1, "artefacts": [{"path", "kind", "title"}, ...]}``
with ``path`` relative to the folder (POSIX separators) and ``kind`` one of
:data:`KINDS`. :func:`record` is idempotent (recording a path again updates its
entry in place) and rewrites the file atomically; it is meant for one writer
process per folder (rank 0 under torchrun), like every other file of a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from leukolab.errors import LeukolabError
from leukolab.utils.files import write_text

__all__ = ["KINDS", "MANIFEST", "Artefact", "read_manifest", "record"]

#: the manifest's file name in each output folder
MANIFEST = "artefacts.json"
#: what an artefact can be (the report renders each kind its own way)
KINDS = ("config", "metrics", "history", "table", "figure", "html")
_FORMAT = 1


@dataclass(frozen=True)
class Artefact:
    """One listed file: ``path`` relative to the manifest's folder, its ``kind`` and a human ``title``."""

    path: str
    kind: str
    title: str


def _relative(folder: Path, path: Path | str) -> str:
    path = Path(path)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(folder.resolve())
        except ValueError:
            raise ValueError(f"{path} is not inside {folder}; a manifest lists only its own folder's files") from None
    if not path.parts or ".." in path.parts:
        raise ValueError(f"{path!s}: expected a file path inside {folder}")
    return path.as_posix()


def read_manifest(folder: Path | str) -> list[Artefact] | None:
    """The artefacts listed in ``folder/artefacts.json`` (in the order first recorded), or ``None``
    when the folder has no manifest (e.g. a run made by an older leukolab).

    Raises :class:`LeukolabError` when the file exists but is not a manifest.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["artefacts"]
        out = [Artefact(str(e["path"]), str(e["kind"]), str(e.get("title", ""))) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LeukolabError(
            f"{path}: not a leukolab artefact manifest ({exc.__class__.__name__}: {exc}); "
            'expected {"artefacts": [{"path", "kind", "title"}, ...]}'
        ) from None
    return out


def record(folder: Path | str, path: Path | str, kind: str, title: str) -> Path:
    """List ``path`` (relative to ``folder``, or absolute inside it) as an artefact of ``kind``.

    Creates ``folder/artefacts.json`` when missing; recording a path that is
    already listed replaces its kind and title in place (no duplicates). The
    manifest is rewritten atomically. Returns the manifest's path.
    """
    if kind not in KINDS:
        raise ValueError(f"artefact kind {kind!r} is not one of {', '.join(KINDS)}")
    folder = Path(folder)
    entry = Artefact(_relative(folder, path), kind, str(title))
    entries = read_manifest(folder) or []
    for i, old in enumerate(entries):
        if old.path == entry.path:
            if old == entry:
                return folder / MANIFEST
            entries[i] = entry
            break
    else:
        entries.append(entry)
    text = json.dumps({"format": _FORMAT, "artefacts": [asdict(e) for e in entries]}, indent=2) + "\n"
    return write_text(folder / MANIFEST, text, overwrite=True)
