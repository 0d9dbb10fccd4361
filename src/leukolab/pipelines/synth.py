"""The ``synth`` recipes: procedural synthetic data sets written to a new folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leukolab.data.synthetic import make_pool, make_tissue_dataset, make_wbc_dataset

__all__ = ["SynthOptions", "synth_pool", "synth_tissue", "synth_wbc"]


@dataclass
class SynthOptions:
    """What every synthetic set shares.

    Attributes:
        size: image side in pixels.
        seed: random seed (the same seed writes the same images).
        difficulty: 0 = easy ... 1 = hard.
        progress: draw a progress bar.
    """

    size: int = 64
    seed: int = 0
    difficulty: float = 0.5
    progress: bool = True


def synth_wbc(out: Path | str, n_per_class: int, options: SynthOptions | None = None) -> Path:
    """Synthetic WBC crops: one folder per class, ``masks/`` and ``metadata.csv``; returns the folder."""
    o = options or SynthOptions()
    return make_wbc_dataset(Path(out), n_per_class, size=o.size, seed=o.seed, difficulty=o.difficulty,
                            progress=o.progress)


def synth_pool(out: Path | str, n: int, tissue_fraction: float = 0.3, options: SynthOptions | None = None) -> Path:
    """An unlabelled pretraining pool: WBC crops mixed with ``tissue_fraction`` off-domain tissue patches."""
    o = options or SynthOptions()
    return make_pool(Path(out), n, size=o.size, seed=o.seed, tissue_fraction=tissue_fraction,
                     difficulty=o.difficulty, progress=o.progress)


def synth_tissue(out: Path | str, n: int, options: SynthOptions | None = None) -> Path:
    """A labelled tissue set: ``normal/`` and ``tumour/`` patches (balanced, ``n`` in all) and ``metadata.csv``."""
    o = options or SynthOptions()
    return make_tissue_dataset(Path(out), n, size=o.size, seed=o.seed, difficulty=o.difficulty, progress=o.progress)
