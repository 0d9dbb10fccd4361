"""Progress bars (tqdm) that stay quiet when asked to."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enable: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar when ``enable``."""
    if not enable:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
