"""Argument checks of the synthetic generators: each bad value is a one-line :class:`LeukolabError`."""

from __future__ import annotations

import math

import numpy as np

from leukolab.errors import LeukolabError


def check_size(size: object, name: str = "size", minimum: int = 16) -> int:
    """``size`` as an int, if it is an integer of at least ``minimum`` pixels."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < minimum:
        raise LeukolabError(f"{name} must be an integer >= {minimum} pixels, got {size!r}")
    return int(size)


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float, if it is a finite number in [0, 1]."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise LeukolabError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_positive(name: str, value: object, maximum: float = math.inf) -> float:
    """``value`` as a float, if it is a finite number in (0, ``maximum``]."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 < float(value) <= maximum:  # type: ignore[arg-type]
        raise LeukolabError(f"{name} must be a number in (0, {maximum:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_count(name: str, value: object) -> int:
    """``value`` as an int, if it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise LeukolabError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_seed(seed: object) -> int:
    """``seed`` as an int, if it is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise LeukolabError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
