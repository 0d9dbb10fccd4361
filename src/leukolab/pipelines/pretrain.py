"""Self-supervised pretraining (the ``pretrain`` command): MAE or DINO on unlabelled folders.

Config (``configs/pretrain.yaml``) -> images (folders read recursively, a
deterministic share per folder left out, a seeded validation split) ->
objective (:class:`~leukolab.objectives.mae.MAEObjective` or
:class:`~leukolab.objectives.dino.DINOObjective`) -> the shared
:class:`~leukolab.training.loop.Trainer` -> run folder with ``config.yaml``,
``splits.csv``, ``history.csv``, ``curves.png``, ``best.pt``, ``last.pt``
(and ``reconstructions.png`` for MAE).

Checkpoints hold the backbone in timm naming (``backbone``) with
``backbone_name``, ``img_size``, ``backbone_kwargs`` (``reg_tokens`` included
when registers were used), ``registers`` and ``task`` (``pretrain-mae`` /
``pretrain-dino``); :func:`leukolab.models.weights.checkpoint_backbone_spec`
reads them back so that a classifier can be built with the matching architecture before
:func:`leukolab.models.weights.load_backbone_weights` loads the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from leukolab.config import diff_overrides, read_yaml, resolve
from leukolab.data.checks import require_readable
from leukolab.data.dataset import ImageDataset
from leukolab.data.multicrop import MultiCropTransform
from leukolab.data.readers import IMAGE_EXTENSIONS, list_images
from leukolab.data.transforms import MEAN, STD, eval_transform
from leukolab.errors import LeukolabError
from leukolab.evaluation.plots import plot_curves
from leukolab.models.backbones import create_backbone, is_vit, resolve_backbone_name
from leukolab.objectives.base import Objective
from leukolab.objectives.dino import DINOObjective
from leukolab.objectives.mae import MAEObjective
from leukolab.training import distributed
from leukolab.training.loaders import build_loader
from leukolab.training.loop import Trainer, TrainerConfig
from leukolab.utils.runs import dump_yaml, new_run_dir
from leukolab.utils.seed import seed_everything

METHODS = ("mae", "dino")



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


def mae_transform(img_size: int) -> v2.Compose:
    """MAE augmentation: random resized crop (scale 0.2-1), flips, normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop((img_size, img_size), scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def multicrop_transform(cfg: dict[str, Any]) -> MultiCropTransform:
    """The DINO views of a resolved config."""
    d = cfg["dino"]
    return MultiCropTransform(cfg["data"]["img_size"], d["local_size"], d["local_crops"], d["global_scale"],
                              d["local_scale"], d["jitter"])


def make_loader(paths: list[Path], transform: Any, batch_size: int, *, train: bool, num_workers: int = 0,
                cache: bool = False, seed: int = 0, max_side: int | None = None) -> DataLoader:
    """A DataLoader of ``(transformed image, -1)`` over unlabelled ``paths`` (shrunk to ``max_side`` on decoding)."""
    ds = ImageDataset(paths, None, transform, cache=cache, max_side=max_side)
    return build_loader(ds, batch_size, train=train, num_workers=num_workers, seed=seed)


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
    resolved = resolve_backbone_name(name)
    refusal = (f"--registers {registers}: backbone {resolved} cannot take register tokens; "
               "expected a Vision Transformer such as vit_tiny_patch16")
    try:
        model = create_backbone(resolved, img_size, reg_tokens=registers, **{k: v for k, v in kwargs.items()
                                                                             if k != "reg_tokens"})
    except LeukolabError:
        raise LeukolabError(refusal) from None
    if getattr(model, "reg_token", None) is None:
        raise LeukolabError(refusal)
    kwargs["reg_tokens"] = registers
    return kwargs


def build_objective(cfg: dict[str, Any]) -> Objective:
    """The MAE or DINO objective of a resolved config."""
    method = cfg["method"]
    if method not in METHODS:
        raise LeukolabError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    m, img_size = cfg["model"], int(cfg["data"]["img_size"])
    name = resolve_backbone_name(m["backbone"])
    kwargs = backbone_kwargs_with_registers(name, img_size, m["registers"], m.get("backbone_kwargs") or {})
    extras = {"config": cfg}
    if method == "mae":
        c = cfg["mae"]
        ratio = float(c["mask_ratio"])
        if not 0.0 < ratio < 1.0:
            raise LeukolabError(f"mask ratio {ratio} is outside (0, 1); expected e.g. 0.75")
        return MAEObjective(
            name, img_size, kwargs, mask_ratio=ratio, decoder_dim=c["decoder_dim"], decoder_depth=c["decoder_depth"],
            decoder_heads=c["decoder_heads"], norm_pix_loss=c["norm_pix_loss"],
            visible_loss_weight=c["visible_loss_weight"], fixed_pos_embed=c["fixed_pos_embed"],
            drop_path=m["drop_path"], extras=extras,
        )
    c = cfg["dino"]
    if int(c["local_crops"]) < 0:
        raise LeukolabError(f"local crops {c['local_crops']} must be >= 0")
    objective = DINOObjective(
        name, img_size, kwargs, out_dim=c["out_dim"], hidden_dim=c["hidden_dim"], bottleneck_dim=c["bottleneck_dim"],
        student_temp=c["student_temp"], teacher_temp=c["teacher_temp"], warmup_teacher_temp=c["warmup_teacher_temp"],
        teacher_temp_warmup_ratio=c["teacher_temp_warmup_ratio"], momentum=c["momentum"],
        center_momentum=c["center_momentum"], koleo_weight=c["koleo_weight"],
        freeze_last_layer_ratio=c["freeze_last_layer_ratio"], drop_path=m["drop_path"], extras=extras,
    )
    backbone = objective.student.backbone
    if is_vit(backbone) and int(c["local_crops"]) > 0:
        patch = backbone.patch_embed.patch_size[0]
        if int(c["local_size"]) % patch:
            raise LeukolabError(f"local crop size {c['local_size']} is not a multiple of {name}'s patch size {patch}")
    return objective


# --------------------------------------------------------------------------- run
def _effective_lr(cfg: dict[str, Any]) -> float:
    world = distributed.world_size()
    o = cfg["optim"]
    return float(o["base_lr"]) * int(cfg["data"]["batch_size"]) * int(o["grad_accum"]) * world / 256


def trainer_config(cfg: dict[str, Any]) -> TrainerConfig:
    """The loop's knobs: ``lr = base_lr * batch * accum * world / 256``, warm-up as a share of the epochs."""
    tc = TrainerConfig.from_config(cfg)
    tc.lr = _effective_lr(cfg)
    tc.warmup_epochs = float(cfg["optim"]["warmup_ratio"]) * int(cfg["train"]["epochs"])
    return tc


def _load_config(config_file: Path | None, overrides: dict[str, Any], resume: Path | None) -> dict[str, Any]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise LeukolabError(f"cannot resume: {run_dir} has no config.yaml; expected a leukolab pretrain run folder")
        cfg = read_yaml(run_dir / "config.yaml")
        if cfg.get("method") not in METHODS:
            raise LeukolabError(f"cannot resume: {run_dir} is not a leukolab pretrain run")
        conflicts = diff_overrides(cfg, overrides)
        if conflicts:
            raise LeukolabError(f"cannot resume {run_dir} with a different config: {'; '.join(conflicts)}")
        return cfg
    cfg = resolve("pretrain", config_file, overrides)
    paths = cfg["data"]["paths"]
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise LeukolabError("no DATA given; expected one or more folders of unlabelled images")
    cfg["data"]["paths"] = [str(Path(p).resolve()) for p in paths]
    return cfg


def pretrain(
    out: Path | str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | str | None = None,
    name: str | None = None,
) -> Path:
    """Pretrain a backbone with MAE or DINO; returns the run folder.

    ``resume`` continues the interrupted run in that folder with its saved
    config; overrides that disagree with it are refused.
    """
    overrides = overrides or {}
    cfg = _load_config(config_file, overrides, Path(resume) if resume is not None else None)
    seed = int(cfg["seed"])
    seed_everything(seed)
    distributed.init_distributed(cfg["train"]["device"])
    d = cfg["data"]
    if int(d["batch_size"]) < 1:
        raise LeukolabError(f"batch size {d['batch_size']} must be >= 1")
    used, ignored = collect_images(d["paths"], float(d["ignore_fraction"]))
    train_paths, val_paths = split_pool(used, float(d["val_fraction"]), seed)
    objective = build_objective(cfg)  # before any file is written: bad options leave nothing behind
    if d["check_images"] and resume is None:
        require_readable(used, cfg["train"]["progress"])
    if resume is None:
        if out is None:
            raise LeukolabError("no --out folder given for the run")
        run_dir = distributed.shared_run_dir(
            lambda: new_run_dir(out, name or f"{cfg['method']}-{cfg['model']['backbone']}-s{seed}"))
        if distributed.is_main():
            dump_yaml(cfg, run_dir / "config.yaml")
            rows = ([(str(p), "train") for p in train_paths] + [(str(p), "val") for p in val_paths]
                    + [(str(p), "ignored") for p in ignored])
            pd.DataFrame(rows, columns=["path", "split"]).to_csv(run_dir / "splits.csv", index=False)
    else:
        run_dir = Path(resume)
    img_size, bs = int(d["img_size"]), int(d["batch_size"])
    if cfg["method"] == "mae":
        train_tf, val_tf = mae_transform(img_size), eval_transform(img_size)
    else:
        train_tf = val_tf = multicrop_transform(cfg)
    loader_kw = dict(num_workers=int(d["num_workers"]), cache=bool(d["cache_images"]), seed=seed,
                     max_side=2 * img_size)
    train_loader = make_loader(train_paths, train_tf, bs, train=True, **loader_kw)
    val_loader = make_loader(val_paths, val_tf, bs, train=False, **loader_kw) if val_paths else None
    if isinstance(objective, MAEObjective):
        pool = val_paths or train_paths
        preview_paths = pool[:: max(1, len(pool) // 8)][:8]  # spread over the pool (its folders are sorted)
        ds = ImageDataset(preview_paths, None, eval_transform(img_size))
        objective.set_preview(torch.stack([ds[i][0] for i in range(len(ds))]))
    trainer = Trainer(objective, trainer_config(cfg), run_dir, meta={"lr": _effective_lr(cfg)})
    if resume is not None:
        trainer.resume(run_dir / "last.pt")
    trainer.fit(train_loader, val_loader)
    if distributed.is_main():
        plot_curves(pd.DataFrame(trainer.history), run_dir / "curves.png", title=run_dir.name)
    return run_dir
