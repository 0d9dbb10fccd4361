"""The one atomic file writer: a reader sees the old file or the new one, never half of one.

Every file leukolab writes goes through :func:`atomic_write`: the content is
written to a hidden temporary sibling and then moved into place with
:func:`os.replace`. With ``overwrite=False`` (the default: results are never
lost) an existing target is refused with a one-line :class:`LeukolabError`,
before and after writing. The same works for folders (:func:`atomic_folder`),
which are filled in a temporary sibling folder and then moved into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from leukolab.errors import LeukolabError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise LeukolabError(f"{path} already exists; refusing to overwrite it")


def atomic_write(path: Path | str, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``fill(tmp)`` to write a temporary sibling file, then move it to ``path``.

    ``overwrite=False`` refuses an existing ``path`` (checked before and after
    ``fill``); ``overwrite=True`` replaces it atomically. Missing parent folders
    are created. The temporary file is removed whatever happens.
    """
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeukolabError(f"cannot create folder {path.parent} ({exc.strerror or exc})") from None
    tmp = _tmp_sibling(path)
    try:
        fill(tmp)
        if not overwrite:
            _refuse_existing(path)  # appeared while we were writing
        os.replace(tmp, path)
    except OSError as exc:
        raise LeukolabError(f"cannot write {path} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def link_or_copy(src: Path | str, dst: Path | str) -> Path:
    """Make ``dst`` hold what ``src`` holds now: a hard link where the disk allows one, else a copy.

    A hard link costs no disk space. It stays correct when ``src`` is later
    replaced by :func:`atomic_write` (that gives ``src`` a new file and leaves
    the linked one as it was). ``dst`` is replaced atomically.
    """

    def fill(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (another file system, FAT, some network shares)
            shutil.copyfile(src, tmp)

    return atomic_write(dst, fill, overwrite=True)


def write_text(path: Path | str, text: str, *, overwrite: bool = False) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_bytes(path: Path | str, data: bytes, *, overwrite: bool = False) -> Path:
    """Atomically write ``data`` to ``path``; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def atomic_folder(out: Path | str, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary sibling folder with ``fill(tmp)``, then move it to ``out``.

    ``out`` must be absent or an empty folder (checked before and after
    filling); on any failure the temporary folder is removed and ``out`` is
    left as it was.
    """
    out = Path(out)

    def check() -> None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise LeukolabError(f"{out} already exists and is not empty; refusing to overwrite it")

    check()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    tmp.mkdir()  # (unlike tempfile.mkdtemp this honours the umask, as the final folder should)
    try:
        fill(tmp)
        check()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
