"""Progress bars (tqdm) that stay quiet when asked to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enable: bool = True, total: int | None = None) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar (which has ``set_postfix``) when ``enable``, else as is."""
    if not enable:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
