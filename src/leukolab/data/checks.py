"""Find unreadable images before any training starts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from leukolab.errors import LeukolabError
from leukolab.utils.progress import progress


def is_readable_image(path: Path) -> bool:
    """True if Pillow can fully decode ``path``."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def find_unreadable(paths: Iterable[Path], show_progress: bool = True) -> list[Path]:
    """The subset of ``paths`` that cannot be decoded."""
    items = list(paths)
    return [p for p in progress(items, desc="checking images", enable=show_progress) if not is_readable_image(p)]


def require_readable(paths: Iterable[Path], show_progress: bool = True) -> None:
    """Raise a :class:`LeukolabError` listing unreadable images, if any."""
    bad = find_unreadable(paths, show_progress)
    if bad:
        shown = ", ".join(str(p) for p in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LeukolabError(
            f"{len(bad)} unreadable image(s): {shown}{more}; expected decodable image files "
            "(remove them or pass --no-check-images to skip this check)"
        )
