"""Anything that turns cell images into class probabilities: a trained run, or an ensemble of runs.

:func:`load_predictor` is the one entry point ``evaluate``, ``predict`` and
``smear analyse`` use, so an ensemble folder is accepted wherever a single run
is. A predictor takes PIL images (crops from a smear field, or decoded files)
and returns probabilities over its ``class_names``; each member of an ensemble
applies its own input size and preprocessing, so members may differ in backbone
and image size (a CNN at 64 px and a ViT at 96 px).

:func:`predict_paths` applies a predictor to image files batch by batch (a
DataLoader, whose worker processes can decode the next batch while the model
runs; each image is decoded once, however many members an ensemble has). Under ``torchrun`` every rank
predicts its :func:`~leukolab.training.distributed.shard` of the files and rank 0
gets the merged rows (:func:`~leukolab.training.distributed.gather_shards`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from leukolab.data.dataset import load_rgb, shrink
from leukolab.data.preprocess import fallback_count, run_preprocess
from leukolab.data.transforms import eval_transform
from leukolab.errors import LeukolabError
from leukolab.models.tta import tta_probabilities
from leukolab.training import distributed
from leukolab.training.loop import pick_device
from leukolab.utils.progress import progress

#: the file that marks an ensemble folder (written by ``leukolab ensemble fit``)
ENSEMBLE_FILE = "ensemble.yaml"


class Predictor(Protocol):
    """Class probabilities of cell images."""

    class_names: list[str]

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        """``(N, K)`` probabilities of ``images`` over :attr:`class_names` (rows sum to 1)."""
        ...



@dataclass
class RunPredictor:
    """A ``leukolab train`` run applied as in its own evaluation (same preprocessing, resize and normalisation).

    ``tta``: average the probabilities over the 8 dihedral views (:mod:`leukolab.models.tta`).
    ``backbone``: the run's timm backbone name (for tables).
    ``preprocess``: the run's cell crop / stain normalisation before the resize
    (:func:`~leukolab.data.preprocess.run_preprocess`; None: none).
    """

    model: torch.nn.Module
    class_names: list[str]
    img_size: int
    tta: bool = False
    source: str = ""
    backbone: str = ""
    preprocess: Callable[[Image.Image], Image.Image] | None = None

    @property
    def fallbacks(self) -> int:
        """Images in which the run's cell crop found no cell (they were used whole)."""
        return fallback_count(self.preprocess)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The preprocessed batch ``(N, 3, img_size, img_size)`` of ``images``."""
        tf = eval_transform(self.img_size)
        pre = self.preprocess
        return torch.stack([tf(shrink(pre(im) if pre is not None else im.convert("RGB"), 2 * self.img_size))
                            for im in images])

    @torch.no_grad()
    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        self.model.eval()
        out = [np.zeros((0, len(self.class_names)), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            x = self.tensors(images[start:start + batch_size]).to(self.device)
            out.append(tta_probabilities(self.model, x, self.tta).cpu().numpy())
        return np.concatenate(out)


@dataclass
class EnsemblePredictor:
    """A weighted mean of its members' probabilities (weights >= 0, summing to 1)."""

    members: list[Predictor]
    weights: np.ndarray
    class_names: list[str]
    source: str = ""
    tta: bool = False

    @property
    def fallbacks(self) -> int:
        """Images in which a member's cell crop found no cell (the largest count over the members)."""
        return max((int(getattr(m, "fallbacks", 0)) for m in self.members), default=0)

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        total = np.zeros((len(images), len(self.class_names)), dtype=np.float64)
        for w, member in zip(self.weights, self.members, strict=True):
            if w > 0:
                total += float(w) * member.predict_images(images, batch_size)
        return total.astype(np.float32)


def is_ensemble(path: Path | str) -> bool:
    """Whether ``path`` is an ensemble folder."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def read_ensemble(path: Path | str) -> dict[str, Any]:
    """The ``ensemble.yaml`` of an ensemble folder: ``members`` (run paths), ``weights``, ``class_names``
    (and, from ``leukolab ensemble fit``, ``objective``, ``data`` and ``tta``)."""
    file = Path(path) / ENSEMBLE_FILE
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LeukolabError(f"{file}: cannot read the ensemble ({exc.__class__.__name__}); expected the YAML "
                            "written by leukolab ensemble fit") from None
    if not isinstance(spec, dict) or not {"members", "weights", "class_names"} <= set(spec):
        raise LeukolabError(f"{file}: expected keys members, weights and class_names")
    if len(spec["members"]) != len(spec["weights"]) or not spec["members"]:
        raise LeukolabError(f"{file}: expected one weight per member and at least one member")
    return spec


def load_predictor(path: Path | str, tta: bool | None = False,
                   device: torch.device | str | None = None) -> Predictor:
    """A trained classifier run folder (or its ``best.pt``) or an ensemble folder, ready to predict.

    ``tta``: average over the 8 dihedral views; ``None`` means the setting an ensemble's weights were
    fitted with (its ``tta`` entry), and no TTA for a single run. A detection, MIL or pretraining run is
    refused with a one-line error naming it.
    """
    from leukolab.pipelines.classify import load_run  # the run reader lives with the train command

    path = Path(path)
    dev = torch.device(device) if isinstance(device, str) else device
    if is_ensemble(path):
        spec = read_ensemble(path)
        use_tta = bool(spec.get("tta", False)) if tta is None else bool(tta)
        members = [load_predictor(p, use_tta, dev) for p in ensemble_members(path, spec)]
        names = list(spec["class_names"])
        for m, member in zip(spec["members"], members, strict=True):
            if list(member.class_names) != names:
                raise LeukolabError(f"{path}: member {m} has classes {member.class_names}; the ensemble has {names}")
        weights = np.asarray(spec["weights"], dtype=np.float64)
        if (weights < 0).any() or not np.isclose(weights.sum(), 1.0, atol=1e-6):
            raise LeukolabError(f"{path / ENSEMBLE_FILE}: weights {weights.tolist()}; expected weights >= 0 "
                                "summing to 1")
        return EnsemblePredictor(members, weights, names, str(path), use_tta)
    objective, cfg = load_run(path, dev or pick_device("auto"))
    return run_predictor(objective.model, objective.class_names, cfg, path, bool(tta))


def run_predictor(model: torch.nn.Module, class_names: Sequence[str], cfg: dict[str, Any], path: Path | str,
                  tta: bool = False) -> RunPredictor:
    """A loaded run's network fed as its evaluation feeds it (``cfg``: the run's config; ``path``: its folder
    or checkpoint, where its stain normaliser lives)."""
    path = Path(path)
    preprocess = run_preprocess(cfg["data"], path.parent if path.is_file() else path)
    return RunPredictor(model, list(class_names), int(cfg["data"]["img_size"]), tta, str(path),
                        str(cfg["model"]["backbone"]), preprocess)


def ensemble_members(folder: Path | str, spec: dict[str, Any] | None = None) -> list[Path]:
    """The member run paths of an ensemble folder (relative entries resolved against the folder)."""
    folder = Path(folder)
    spec = spec if spec is not None else read_ensemble(folder)
    return [_member_path(folder, str(m)) for m in spec["members"]]


def _member_path(folder: Path, member: str) -> Path:
    p = Path(member)
    return p if p.is_absolute() else (folder / p).resolve()


class _ImageFiles(Dataset):
    """Decoded RGB images of a list of files (the items of :func:`predict_paths`' loader)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])


def _as_list(batch: list[Image.Image]) -> list[Image.Image]:
    return batch  # a module-level collate_fn (loader workers pickle it)


def predict_paths(
    predictor: Predictor, paths: Sequence[Path], batch_size: int = 128, *, show_progress: bool = True,
    num_workers: int = 0, desc: str = "predicting",
) -> np.ndarray | None:
    """``(N, K)`` probabilities of image files, in order, over ``predictor.class_names``.

    Images are decoded ``batch_size`` at a time (``num_workers`` loader processes decode while the
    model runs), with a progress bar over the batches. Under ``torchrun`` each rank predicts its
    :func:`~leukolab.training.distributed.shard` of ``paths`` and the full array is returned on rank 0,
    ``None`` on the other ranks; without ``torchrun`` every file is predicted here.
    """
    if batch_size < 1:
        raise LeukolabError(f"--batch-size {batch_size} must be at least 1")
    k = len(predictor.class_names)
    mine = distributed.shard(list(paths))
    loader = DataLoader(_ImageFiles(mine), batch_size=batch_size, collate_fn=_as_list, num_workers=num_workers)
    chunks = [np.zeros((0, k), dtype=np.float32)]
    for images in progress(loader, desc, enable=show_progress and distributed.is_main(), total=len(loader)):
        chunks.append(np.asarray(predictor.predict_images(images, batch_size), dtype=np.float32))
    rows = distributed.gather_shards(list(np.concatenate(chunks)), len(paths))
    if rows is None:
        return None
    return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, k), dtype=np.float32)


def same_classes(named: Sequence[tuple[str, Predictor]]) -> list[str]:
    """The class list every ``(name, predictor)`` shares, or a one-line error naming the first that differs."""
    (first, reference), *rest = named
    names = list(reference.class_names)
    for name, predictor in rest:
        if list(predictor.class_names) != names:
            raise LeukolabError(f"{name} has classes {list(predictor.class_names)} but {first} has {names}; "
                                "expected every member to have the same class list")
    return names
