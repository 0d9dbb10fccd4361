"""``--balance none|weights|oversample|augment`` in a training run (``data.balance``).

:func:`balance_mode` resolves the mode (``optim.class_weights: true`` is an alias of ``weights``),
:func:`balanced_train_set` writes ``augment``'s copies into ``RUN/balanced/`` and returns the training
set to read, and :func:`record_class_counts` writes ``class_counts.json`` (and ``.csv``): what the run
trained on. When the run uses cell masks (``--crop cell``, ``--mask-aug``), a copy of an image with a mask
file gets that mask under the copy's flip / rotation (``RUN/balanced/masks/``), and :func:`copy_masks`
hands them to the run's :class:`~leukolab.data.image_options.ImageOptions` (instead of estimating them).
The sampler of ``oversample`` is chosen by :func:`leukolab.training.loaders.build_loader`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from leukolab.data.balance import augment_copies, check_balance_mode, class_counts, read_copies, read_copy_masks
from leukolab.data.image_options import ImageOptions
from leukolab.data.readers import LabelledImages
from leukolab.errors import LeukolabError
from leukolab.evaluation.tables import write_table
from leukolab.pipelines.lifecycle import Run
from leukolab.training import distributed
from leukolab.utils.files import write_text

__all__ = ["BALANCED_DIR", "CLASS_COUNTS", "CLASS_COUNTS_CSV", "balance_mode", "balanced_train_set",
           "copy_masks", "record_class_counts"]

#: the folder of a run that holds ``--balance augment``'s copies
BALANCED_DIR = "balanced"
#: the file of a run that records the per-class counts it trained on
CLASS_COUNTS = "class_counts.json"
#: the same counts as a table (listed in the run's artefact manifest, shown by ``leukolab report``)
CLASS_COUNTS_CSV = "class_counts.csv"


def balance_mode(cfg: Mapping[str, Any]) -> str:
    """The balancing of a resolved train config: ``data.balance``, or ``weights`` when ``optim.class_weights``.

    ``optim.class_weights: true`` with ``oversample`` / ``augment`` would correct twice: refused.
    """
    mode = check_balance_mode(cfg["data"].get("balance") or "none")
    if cfg["optim"].get("class_weights"):
        if mode in ("oversample", "augment"):
            raise LeukolabError(f"--balance {mode} with optim.class_weights: true corrects the class imbalance "
                                "twice; expected one of them (--balance weights is the class-weighted loss)")
        mode = "weights"
    return mode


def balanced_train_set(
    run: Run, train: LabelledImages, class_names: Sequence[str], mode: str,
    tables: Mapping[str, pd.DataFrame] | None = None, progress: bool = True,
) -> LabelledImages:
    """The training set of a run: ``train`` itself, or for ``augment`` ``train`` plus copies of its rarer
    classes up to the majority count in ``RUN/balanced/`` (a resumed run reads the copies it wrote).

    ``augment`` creates the run folder (with ``tables``) first; a class without training images is
    refused before anything is written. When the run uses cell masks, each copy of an image with a mask
    file carries that mask under the copy's geometric transform (:func:`copy_masks` reads them back).
    """
    if mode != "augment":
        return train
    empty = [c for c, n in class_counts(train.labels, class_names).items() if n == 0]
    if empty:
        raise LeukolabError(f"class {empty[0]!r} has no training images; --balance augment needs at least "
                            "one image of every class to copy")
    out = run.create(tables) / BALANCED_DIR
    if run.resumed and out.is_dir():
        paths, labels = read_copies(out)
        return LabelledImages([*train.paths, *paths], [*train.labels, *labels], list(class_names))
    images = ImageOptions.for_run(run.cfg["data"], train.paths, run.seed)  # the mask files, when masks are used
    masks = [images.mask_files.get(p) for p in train.paths] if images.mask_files else None
    paths, labels, _ = distributed.broadcast_from_main(
        lambda: augment_copies(train.paths, train.labels, out, run.seed, class_names=class_names,
                               progress=progress, masks=masks))
    return LabelledImages(list(paths), list(labels), list(class_names))


def copy_masks(run: Run) -> dict[Path, Path]:
    """The mask file of each ``--balance augment`` copy of ``run`` written with one (copy path -> mask path;
    empty without copies or masks): merged into the run's image options so copies are not estimated."""
    if run.dir is None:
        return {}
    return read_copy_masks(run.dir / BALANCED_DIR)


def record_class_counts(
    run: Run, mode: str, original: LabelledImages, trained: LabelledImages, class_names: Sequence[str],
    samples_per_epoch: int, loss_weights: torch.Tensor | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> None:
    """Write ``RUN/class_counts.json`` and ``RUN/class_counts.csv`` (rank 0; a resumed run keeps its files).

    Keys: ``balance`` (the mode), ``images`` (training images per class, before balancing),
    ``trained_on`` (images per class read by training, with ``augment``'s copies), ``copies``,
    ``samples_per_epoch`` and ``expected_draws_per_epoch`` (per class: equal under ``oversample``),
    and ``loss_weights`` (``weights``: the cross-entropy weight of each class). Creates the run
    folder (with ``tables``) when it does not exist yet.
    """
    path = run.create(tables) / CLASS_COUNTS
    if not distributed.is_main() or (run.resumed and path.is_file()):
        return
    before, after = class_counts(original.labels, class_names), class_counts(trained.labels, class_names)
    n = max(1, len(trained))
    if mode == "oversample":
        present = sum(1 for c in class_names if after[c])  # a class without images is never drawn
        draws = {c: samples_per_epoch / present if after[c] else 0.0 for c in class_names}
    else:
        draws = {c: samples_per_epoch * after[c] / n for c in class_names}
    info: dict[str, Any] = {
        "balance": mode, "class_names": list(class_names), "images": before, "trained_on": after,
        "copies": {c: after[c] - before[c] for c in class_names}, "samples_per_epoch": int(samples_per_epoch),
        "expected_draws_per_epoch": {c: round(v, 3) for c, v in draws.items()},
    }
    if loss_weights is not None:
        info["loss_weights"] = {c: round(float(w), 6) for c, w in zip(class_names, loss_weights, strict=True)}
    write_text(path, json.dumps(info, indent=2) + "\n")
    table = pd.DataFrame({"class": list(class_names), "images": [before[c] for c in class_names],
                          "copies": [info["copies"][c] for c in class_names],
                          "trained_on": [after[c] for c in class_names],
                          "expected_draws_per_epoch": [info["expected_draws_per_epoch"][c] for c in class_names]})
    if loss_weights is not None:
        table["loss_weight"] = [info["loss_weights"][c] for c in class_names]
    write_table(table, path.parent / CLASS_COUNTS_CSV, f"per-class training counts (--balance {mode})")
