"""Self-supervised pretraining (the ``pretrain`` command): MAE, DINO or a convolutional auto-encoder.

Config (``configs/pretrain.yaml``) -> images (folders read recursively, a
deterministic share per folder left out, a seeded validation split) -> the
objective named by ``method``, built from :data:`leukolab.registry.PRETRAIN_METHODS`
with its config section (``mae:`` / ``dino:`` / ``ae:``) and the ``model:``
backbone (``null``: the method's ``default_backbone``, a ViT for MAE / DINO,
resnet18 for the auto-encoder) -> the shared run lifecycle
(:mod:`leukolab.pipelines.lifecycle`) -> run folder with ``config.yaml``,
``splits.csv``, ``history.csv``, ``curves.png``, ``best.pt``, ``last.pt``
(and ``reconstructions.png`` for MAE and the auto-encoder).

Checkpoints hold the backbone in timm naming (``backbone``) with its
``backbone_spec`` (timm name, ``backbone_kwargs`` with ``reg_tokens`` when
registers were used, image and patch size, normalisation) and ``task``
(``pretrain-mae`` / ``pretrain-dino`` / ``pretrain-ae``); :func:`leukolab.models.weights.load_backbone_weights`
loads them into a classifier of the matching architecture.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import leukolab.objectives  # noqa: F401 - registers the built-in objectives
from leukolab.data.checks import require_readable
from leukolab.data.dataset import ImageDataset
from leukolab.data.readers import IMAGE_EXTENSIONS, list_images
from leukolab.data.transforms import eval_transform
from leukolab.errors import LeukolabError
from leukolab.evaluation.reconstructions import ReconstructionFigure
from leukolab.models.autoencoder import ConvAutoencoder
from leukolab.models.backbones import create_backbone, resolve_backbone_name
from leukolab.objectives.base import PretrainObjective
from leukolab.objectives.mae import MAEObjective
from leukolab.pipelines.lifecycle import open_run
from leukolab.registry import PRETRAIN_METHODS
from leukolab.training import distributed
from leukolab.training.loaders import build_loader
from leukolab.training.loop import TrainerConfig

#: the backbone of a method whose objective names no ``default_backbone``
DEFAULT_BACKBONE = "vit_tiny_patch16_224"
#: ``optim.base_lr`` of a method whose objective names no ``default_base_lr`` (MAE's)
DEFAULT_BASE_LR = 1.5e-4


# --------------------------------------------------------------------------- data
def _ignored_in_folder(images: list[Path], folder: Path, fraction: float) -> set[Path]:
    """``round(n * fraction)`` images of a folder, chosen by a hash of their relative path (seed-free)."""
    n_drop = round(len(images) * fraction)
    if n_drop <= 0:
        return set()
    ranked = sorted(images, key=lambda p: hashlib.sha1(p.relative_to(folder).as_posix().encode()).hexdigest())
    return set(ranked[:n_drop])


def collect_images(folders: list[str | Path], ignore_fraction: float = 0.0) -> tuple[list[Path], list[Path]]:
    """``(used, ignored)`` images below ``folders`` (recursive, any image extension, duplicates once)."""
    if not folders:
        raise LeukolabError("no DATA given; expected one or more folders of unlabelled images")
    if not 0.0 <= ignore_fraction < 1.0:
        raise LeukolabError(f"ignore fraction {ignore_fraction} is outside [0, 1)")
    used: list[Path] = []
    ignored: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder).resolve()
        if not folder.exists():
            raise LeukolabError(f"{folder} does not exist; expected a folder of images")
        if not folder.is_dir():
            raise LeukolabError(f"{folder} is not a folder; expected a folder of images (searched recursively)")
        found = list_images(folder)
        if not found:
            raise LeukolabError(
                f"{folder}: no images found; expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        images = [p for p in found if p not in seen]  # a folder given twice / nested in another counts once
        seen.update(images)
        drop = _ignored_in_folder(images, folder, ignore_fraction)
        used += [p for p in images if p not in drop]
        ignored += [p for p in images if p in drop]
    if not used:
        raise LeukolabError(f"no images left after --ignore-fraction {ignore_fraction}; expected a smaller fraction")
    return used, ignored


def split_pool(paths: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded ``(train, val)`` split; val gets ``round(n * val_fraction)`` images (at least 1 when > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise LeukolabError(f"validation fraction {val_fraction} is outside [0, 1)")
    n = len(paths)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng([seed, 7]).permutation(n)
    val_idx = set(order[:n_val].tolist())
    return [p for i, p in enumerate(paths) if i not in val_idx], [p for i, p in enumerate(paths) if i in val_idx]


def splits_table(train: list[Path], val: list[Path], ignored: list[Path]) -> pd.DataFrame:
    """``splits.csv``: one ``(path, split)`` row per image (``train``, ``val`` or ``ignored``)."""
    rows = [(str(p), s) for s, part in (("train", train), ("val", val), ("ignored", ignored)) for p in part]
    return pd.DataFrame(rows, columns=["path", "split"])


# --------------------------------------------------------------------------- model
def backbone_kwargs_with_registers(name: str, img_size: int, registers: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``reg_tokens`` for ``registers`` > 0; refused for backbones that cannot take them."""
    kwargs = dict(kwargs or {})
    if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
        raise LeukolabError(f"--registers {registers!r} must be an integer >= 0")
    if registers == 0:
        return kwargs
    if kwargs.get("reg_tokens") not in (None, registers):
        raise LeukolabError(f"--registers {registers} disagrees with backbone_kwargs reg_tokens={kwargs['reg_tokens']}")
    refusal = (f"--registers {registers}: backbone {name} cannot take register tokens; "
               "expected a Vision Transformer such as vit_tiny_patch16")
    try:
        model = create_backbone(name, img_size, reg_tokens=registers,
                                **{k: v for k, v in kwargs.items() if k != "reg_tokens"})
    except LeukolabError:
        raise LeukolabError(refusal) from None
    if getattr(model, "reg_token", None) is None:
        raise LeukolabError(refusal)
    kwargs["reg_tokens"] = registers
    return kwargs


def method_backbone(cfg: dict[str, Any]) -> str:
    """``model.backbone``, or when it is null the default of ``cfg["method"]`` (resnet18 for ``ae``, else a ViT)."""
    factory = PRETRAIN_METHODS.get(cfg["method"])  # an unknown method: one line listing the choices
    return cfg["model"].get("backbone") or getattr(factory, "default_backbone", DEFAULT_BACKBONE)


def build_objective(cfg: dict[str, Any]) -> PretrainObjective:
    """The objective named by ``cfg["method"]``, built with the ``model:`` backbone and its own config section."""
    factory = PRETRAIN_METHODS.get(cfg["method"])  # an unknown method: one line listing the choices
    m, img_size = cfg["model"], int(cfg["data"]["img_size"])
    name = resolve_backbone_name(method_backbone(cfg))
    kwargs = backbone_kwargs_with_registers(name, img_size, m["registers"], m.get("backbone_kwargs") or {})
    return factory(backbone=name, img_size=img_size, backbone_kwargs=kwargs, drop_path=m["drop_path"],
                   **cfg.get(cfg["method"], {}))


# --------------------------------------------------------------------------- run
def effective_lr(cfg: dict[str, Any]) -> float:
    """``base_lr * batch_size * grad_accum * world_size / 256`` (the MAE / DINO scaling rule)."""
    o = cfg["optim"]
    return float(o["base_lr"]) * int(cfg["data"]["batch_size"]) * int(o["grad_accum"]) * distributed.world_size() / 256


def trainer_config(cfg: dict[str, Any]) -> TrainerConfig:
    """The loop's knobs: the effective learning rate, warm-up as a share of the epochs."""
    tc = TrainerConfig.from_config(cfg)
    tc.lr = effective_lr(cfg)
    tc.warmup_epochs = float(cfg["optim"]["warmup_ratio"]) * int(cfg["train"]["epochs"])
    return tc


def _prepare(cfg: dict[str, Any]) -> None:
    """A new run's data folders made absolute, its backbone and base learning rate set (the method's defaults
    when null)."""
    cfg["model"]["backbone"] = method_backbone(cfg)
    if cfg["optim"].get("base_lr") is None:
        factory = PRETRAIN_METHODS.get(cfg["method"])
        cfg["optim"]["base_lr"] = float(getattr(factory, "default_base_lr", DEFAULT_BASE_LR))
    paths = cfg["data"]["paths"]
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    if not paths:
        raise LeukolabError("no DATA given; expected one or more folders of unlabelled images")
    cfg["data"]["paths"] = [str(Path(p).resolve()) for p in paths]


def pretrain(
    out: Path | str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | str | None = None,
    name: str | None = None,
) -> Path:
    """Pretrain a backbone with MAE, DINO or a convolutional auto-encoder; returns the run folder.

    ``resume`` continues the interrupted run in that folder with its saved
    config; overrides that disagree with it are refused.
    """
    run = open_run("pretrain", out, config_file, overrides, resume, prepare=_prepare,
                   name=name or (lambda c: f"{c['method']}-{c['model']['backbone']}-s{c['seed']}"))
    cfg, d = run.cfg, run.cfg["data"]
    used, ignored = collect_images(d["paths"], float(d["ignore_fraction"]))
    train_paths, val_paths = split_pool(used, float(d["val_fraction"]), run.seed)
    objective = build_objective(cfg)  # before any file is written: bad options leave nothing behind
    train_tf, val_tf = objective.transforms()
    if d["check_images"] and not run.resumed:
        require_readable(used, cfg["train"]["progress"])
    img_size, bs = int(d["img_size"]), int(d["batch_size"])

    def loader(paths: list[Path], transform: Any, train: bool) -> Any:
        ds = ImageDataset(paths, None, transform, cache=bool(d["cache_images"]), max_side=2 * img_size)
        return build_loader(ds, bs, train=train, num_workers=int(d["num_workers"]), seed=run.seed)

    callbacks = []
    model = getattr(objective, "model", None)
    if isinstance(objective, MAEObjective) or isinstance(model, ConvAutoencoder):
        pool = val_paths or train_paths
        preview = ImageDataset(pool[:: max(1, len(pool) // 8)][:8], None, eval_transform(img_size))  # spread out
        images = torch.stack([preview[i][0] for i in range(len(preview))])
        callbacks.append(ReconstructionFigure(model, images))
    run.fit(objective, loader(train_paths, train_tf, True), loader(val_paths, val_tf, False) if val_paths else None,
            trainer_config(cfg), tables={"splits.csv": splits_table(train_paths, val_paths, ignored)},
            meta={"lr": effective_lr(cfg)}, callbacks=callbacks)
    return run.dir
