"""``leukolab adapt``: a classifier run adapted to another lab's unlabelled images (AdaBN).

:func:`adapt_run` feeds the new lab's images through a trained run exactly as
``evaluate`` feeds them (its cell crop and stain normalisation, resize,
normalisation), recomputes every BatchNorm layer's running statistics on them
(:func:`leukolab.models.bn_adapt.adapt_batchnorm`), and writes the result as a
new run folder that ``evaluate``, ``predict``, ``embed``, ``ensemble fit`` and
``smear analyse`` accept like any run. No weight trains and no label is read.
The source run is never modified; the new folder records where it came from
(``config.yaml``'s ``adapt:`` section, ``adapt_images.csv``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from leukolab.checkpoints import load_run_state, save_checkpoint
from leukolab.data.dataset import load_rgb
from leukolab.data.preprocess import fallbacks_reported_by_caller
from leukolab.data.readers import expand_image_inputs
from leukolab.errors import LeukolabError
from leukolab.evaluation.tables import write_table
from leukolab.models.bn_adapt import adapt_batchnorm, batchnorm_layers
from leukolab.pipelines.predictors import RunPredictor, is_ensemble, run_predictor
from leukolab.training.loop import pick_device
from leukolab.utils.files import atomic_folder, write_text
from leukolab.utils.progress import progress as bar

__all__ = ["MIN_IMAGES", "adapt_run"]

#: fewest images whose statistics replace a run's (batch statistics of a handful of cells are noise)
MIN_IMAGES = 8
#: run files copied into the adapted folder when present (evaluate's default test split, the stain normaliser,
#: the training class counts)
COPIED = ("splits.csv", "stain_norm.yaml", "class_counts.csv", "class_counts.json", "history.csv")


def _batches(predictor: RunPredictor, paths: Sequence[Path], batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    for start in bar(range(0, len(paths), batch_size), "adapting", progress,
                     total=(len(paths) + batch_size - 1) // batch_size):
        chunk = paths[start:start + batch_size]
        if len(chunk) < 2 and start:  # a 1-image batch has no spread; its cells are in the earlier batches' order
            continue
        yield predictor.tensors([load_rgb(p) for p in chunk]).to(predictor.device)


def adapt_run(
    run: Path | str, images: Sequence[Path | str], out: Path | str, *, batch_size: int = 64, seed: int = 0,
    max_images: int | None = None, device: str = "auto", progress: bool = True,
) -> Path:
    """Write ``out``: ``run`` with its BatchNorm statistics recomputed on ``images`` (files and/or folders).

    The images are shuffled with ``seed`` (so batches mix the types of a folder sorted by type), at most
    ``max_images`` of them are used, and they are prepared as ``evaluate`` prepares the run's inputs.
    ``out`` holds ``best.pt`` (the run's checkpoint with the adapted weights), ``config.yaml`` (the run's,
    plus ``adapt:``), ``adapt_images.csv`` and the run's ``splits.csv`` / ``stain_norm.yaml`` when present.

    Raises:
        LeukolabError: ``run`` is an ensemble folder or no classifier run, its network has no BatchNorm layer
            (ViTs), fewer than :data:`MIN_IMAGES` images, an unreadable image, or ``out`` exists and is not empty.
    """
    from leukolab.pipelines.classify import load_run  # the run reader lives with the train command

    run = Path(run)
    if is_ensemble(run):
        raise LeukolabError(f"{run} is an ensemble folder; adapt each member run, then fit or write the "
                            "ensemble over the adapted runs")
    if batch_size < 2:
        raise LeukolabError(f"--batch-size {batch_size}: expected at least 2 (batch statistics need 2 images)")
    folder = run.parent if run.is_file() else run
    state = load_run_state(run, "classification", "train")
    objective, cfg = load_run(run, pick_device(device), state)
    if not batchnorm_layers(objective.model):
        raise LeukolabError(f"{run}: its {cfg['model']['backbone']} network has no BatchNorm layer, so there are "
                            "no statistics to adapt (AdaBN needs a CNN such as resnet18)")
    paths = expand_image_inputs(images)
    order = np.random.default_rng(seed).permutation(len(paths))
    paths = [paths[i] for i in order][: max_images if max_images and max_images > 0 else None]
    if len(paths) < MIN_IMAGES:
        raise LeukolabError(f"{len(paths)} image(s) to adapt on; expected at least {MIN_IMAGES} of the new lab's "
                            "cells")
    predictor = run_predictor(objective.model, objective.class_names, cfg, run)
    with fallbacks_reported_by_caller():
        seen = adapt_batchnorm(objective.model, _batches(predictor, paths, batch_size, progress))
    record: dict[str, Any] = {"method": "batchnorm", "source": str(folder.resolve()), "images": seen,
                              "inputs": [str(Path(p).resolve()) for p in images], "seed": int(seed),
                              "batch_size": int(batch_size), "whole_image_fallbacks": int(predictor.fallbacks)}
    new_cfg = {**cfg, "adapt": record}
    objective.cpu()
    new_state = {**state, "objective": objective.state_dict(), "config": new_cfg,
                 "backbone": objective.export_backbone()}

    def fill(root: Path) -> None:
        save_checkpoint(new_state, root / "best.pt")
        write_text(root / "config.yaml", yaml.safe_dump(new_cfg, sort_keys=False))
        for name in COPIED:
            if (folder / name).is_file():
                shutil.copy2(folder / name, root / name)
        write_table(pd.DataFrame({"path": [str(p) for p in paths[:seen]]}), root / "adapt_images.csv",
                    "images whose statistics the BatchNorm layers now use")

    return atomic_folder(out, fill)
