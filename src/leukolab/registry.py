"""Name -> factory registries, so a new backbone, head, objective or adapter is one file.

Usage::

    from leukolab.registry import HEADS

    @HEADS.register("linear")
    def linear_head(in_features: int, num_classes: int) -> nn.Module: ...

    head = HEADS.build("linear", in_features=192, num_classes=5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from leukolab.errors import LeukolabError

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A named collection of factories."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds a factory under ``name``."""

        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        """The factory for ``name``; a :class:`LeukolabError` naming the choices if unknown."""
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items)) or "none registered"
            raise LeukolabError(f"unknown {self.kind} {name!r}; expected one of: {choices}") from None

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


HEADS: Registry[Callable[..., Any]] = Registry("head")
OBJECTIVES: Registry[Callable[..., Any]] = Registry("objective")
ADAPTERS: Registry[Callable[..., Any]] = Registry("adapter")
