"""Name -> factory registries: the only way leukolab builds objectives and heads from a config.

A factory registers itself under a name (optionally with tags); a pipeline builds
it from a config section (the shape of timm's ``create_model`` / solo-learn's
``METHODS[name](cfg)``)::

    from leukolab.registry import HEADS

    @HEADS.register("linear")
    def linear_head(in_features: int, num_classes: int) -> nn.Module: ...

    head = HEADS.build(cfg["model"]["head"], in_features=192, num_classes=5)

An unknown name is a one-line :class:`LeukolabError` listing the choices.
:meth:`Registry.subset` is a live view of the entries with one tag, so that a
command offers only what it can build (``leukolab pretrain --method`` lists the
objectives tagged ``pretrain``, not the classifier's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from leukolab.errors import LeukolabError

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A named collection of factories; ``kind`` names them in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._tags: dict[str, frozenset[str]] = {}
        self._parent: Registry[T] | None = None
        self._tag: str | None = None

    def register(self, name: str, *, tags: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator that adds a factory under ``name``, with ``tags`` for :meth:`subset`."""
        if self._parent is not None:
            raise TypeError(f"register {name!r} on the full registry, not on the {self.kind!r} view")

        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            self._tags[name] = frozenset(tags)
            return fn

        return deco

    def _entries(self) -> dict[str, T]:
        if self._parent is None:
            return self._items
        parent = self._parent
        return {n: f for n, f in parent._entries().items() if self._tag in parent._tags_of(n)}

    def _tags_of(self, name: str) -> frozenset[str]:
        return self._tags.get(name, frozenset()) if self._parent is None else self._parent._tags_of(name)

    def get(self, name: str) -> T:
        """The factory for ``name``; a :class:`LeukolabError` naming the choices if unknown."""
        entries = self._entries()
        if name not in entries:
            choices = ", ".join(sorted(entries)) or "none registered"
            raise LeukolabError(f"unknown {self.kind} {name!r}; expected one of: {choices}")
        return entries[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``kwargs`` (a config section)."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries())

    def subset(self, tag: str, kind: str | None = None) -> Registry[T]:
        """A live, read-only view of the entries tagged ``tag`` (``kind`` names them in its errors)."""
        view: Registry[T] = Registry(kind or f"{tag} {self.kind}")
        view._parent, view._tag = self, tag
        return view

    def __contains__(self, name: object) -> bool:
        return name in self._entries()


#: classification heads (``models/heads.py``): ``HEADS.build(name, in_features=..., num_classes=...)``
HEADS: Registry[Callable[..., Any]] = Registry("head")
#: every trainable task (``objectives/*.py``); the built-in ones register when :mod:`leukolab.objectives` is imported
OBJECTIVES: Registry[Callable[..., Any]] = Registry("objective")
#: the self-supervised methods of ``leukolab pretrain --method`` (objectives tagged ``pretrain``)
PRETRAIN_METHODS: Registry[Callable[..., Any]] = OBJECTIVES.subset("pretrain", kind="method")
#: object detectors (``models/detection.py``): ``DETECTORS.build(name, num_classes=..., **section)``
DETECTORS: Registry[Callable[..., Any]] = Registry("detector")
#: parameter-efficient ViT adapters (``models/adapters/``): ``ADAPTERS.build(name, backbone=vit, **section)``
ADAPTERS: Registry[Callable[..., Any]] = Registry("adapter")
#: MIL aggregators over a patient's cells (``models/mil.py``): ``AGGREGATORS.build(name, in_dim=..., clinical_dim=...)``
AGGREGATORS: Registry[Callable[..., Any]] = Registry("aggregator")
