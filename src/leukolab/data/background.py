"""The ``background`` class: crops that hold no white cell, so a classifier learns to reject false detections.

``leukolab train DATA --background DIR`` adds every image below ``DIR`` as class
``background`` (a ``background`` class folder inside ``DATA`` is simply a class
and needs no option). The smear pipeline drops crops predicted as background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukolab.data.readers import IMAGE_EXTENSIONS, LabelledImages, list_images
from leukolab.errors import LeukolabError

#: the class name of background crops (lower case)
BACKGROUND = "background"


def read_background(folder: Path | str) -> LabelledImages:
    """Every image below ``folder`` (recursive, sorted), labelled ``background``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeukolabError(f"background folder {folder} does not exist; expected a folder of background crops")
    paths = list_images(folder)
    if not paths:
        raise LeukolabError(f"background folder {folder} holds no images; expected files ending in "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return LabelledImages(paths, [BACKGROUND] * len(paths), [BACKGROUND])


def without(data: LabelledImages, known: Sequence[LabelledImages]) -> LabelledImages:
    """``data`` less the images (by resolved path) already in ``known``: a DIR inside DATA is not counted twice."""
    seen = {p.resolve() for part in known for p in part.paths}
    return data.subset([i for i, p in enumerate(data.paths) if p.resolve() not in seen])


def join(a: LabelledImages, b: LabelledImages, class_names: list[str]) -> LabelledImages:
    """The images of ``a`` then ``b``, over ``class_names``."""
    return LabelledImages([*a.paths, *b.paths], [*a.labels, *b.labels], list(class_names))


def assign_folds(n: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` images: a seeded shuffle dealt round-robin over ``n_folds`` folds (sizes within 1)."""
    order = np.random.default_rng([seed, 4241]).permutation(n)
    folds = np.empty(n, dtype=int)
    folds[order] = np.arange(n) % n_folds
    return folds
