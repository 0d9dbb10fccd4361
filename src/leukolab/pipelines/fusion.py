"""The fusion recipe of ``leukolab train --fuse RUN_A --fuse RUN_B``: frozen encoders, one trainable head.

Three steps, called by :mod:`leukolab.pipelines.classify`:

1. :func:`prepare_fusion` (a new run's config): every ``model.fuse`` entry -- a leukolab classification
   or pretraining run, a converted backbone, or a raw ViT / timm state dict
   (:func:`leukolab.models.loading.load_any_backbone`) -- is read once and described by an
   :class:`~leukolab.models.fusion.EncoderRecord`: architecture, own input size and normalisation,
   feature width, and what the fusion does to its input. The records become the ``fusion`` backbone's
   ``backbone_kwargs``; the shared input size (``data.img_size``) is the largest encoder size, so no
   encoder sees an upsampled image; the backbone is frozen. Encoders with different input sizes or
   normalisations are resolved (each gets its own resize and renormalisation), never refused. A source
   run's cell crop or stain normalisation is *not* applied per encoder: the fusion run's own ``--crop`` /
   ``--stain-norm`` prepare the shared input, and a record notes (and the run prints) where they differ
   from what the source was trained with.
2. :func:`load_fusion_weights` (a new model): each encoder's weights loaded from its source, strictly.
   A saved fusion run carries all of them in its checkpoint, so ``evaluate``/``predict`` rebuild it
   from the config and the checkpoint alone: the source runs may be deleted afterwards.
3. :func:`fusion_loaders`: when nothing random happens below the head (no augmentation, MixUp/CutMix,
   stain, degradation or mask augmentation: :func:`cache_blockers`), the encoders' features of the
   training and validation images are computed once, and the loaders yield those instead of images,
   in exactly the batches (same sampler, same generator) the image loaders would have given. The
   head then trains on the same inputs either way (``model.fuse_cache: false`` forces the on-the-fly
   path). Features are computed in float32, without autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from leukolab.checkpoints import LEUKOLAB_MEAN, LEUKOLAB_STD
from leukolab.data.mixing import MixConfig
from leukolab.data.transforms import mean_std
from leukolab.errors import LeukolabError
from leukolab.models.classifier import Classifier
from leukolab.models.fusion import FEATURE_NORMS, EncoderRecord, FusionBackbone, build_encoder
from leukolab.training import distributed
from leukolab.training.loop import move_to, pick_device
from leukolab.utils.progress import progress

__all__ = ["cache_blockers", "fusion_loaders", "load_encoder", "load_fusion_weights", "prepare_fusion"]

#: training-image options whose randomness makes cached features wrong (``data.<key>`` > 0)
_RANDOM_DATA_OPTIONS = ("stain_aug", "degrade", "mask_aug")


def _fuse_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if not isinstance(value, (list, tuple)):
        raise LeukolabError(f"model.fuse {value!r}: expected a list of run folders or checkpoint files")
    return [str(v) for v in value]


def _load(path: Path, allow_pickle: bool) -> tuple[Any, Mapping[str, Any]]:
    """The :class:`~leukolab.models.loading.LoadedBackbone` of ``path`` and its checkpoint object."""
    from leukolab.checkpoints import load_checkpoint, resolve_checkpoint_path
    from leukolab.models.loading import load_any_backbone

    if not path.exists():
        raise LeukolabError(f"--fuse {path} does not exist; expected a leukolab run folder or a checkpoint file")
    try:
        ckpt = resolve_checkpoint_path(path)
        obj = {} if ckpt.suffix == ".safetensors" else load_checkpoint(ckpt, allow_pickle=allow_pickle)
        obj = obj if isinstance(obj, Mapping) else {}
        if isinstance(obj.get("adapter"), Mapping):
            raise LeukolabError("an adapter run (its adapter is not part of a frozen fusion encoder); "
                                "expected a run without --adapter, a pretraining run or a converted checkpoint")
        loaded = load_any_backbone(path, allow_pickle=allow_pickle)
    except LeukolabError as exc:
        raise LeukolabError(f"--fuse {path}: not usable as an encoder: {exc}") from None
    return loaded, obj


def load_encoder(path: Path | str, allow_pickle: bool = False,
                 data: Mapping[str, Any] | None = None) -> tuple[EncoderRecord, nn.Module]:
    """The record of the encoder in ``path`` (run folder or checkpoint) and the encoder with its weights.

    ``data``: the fusion run's ``data:`` options; the record then notes where the source run prepared its
    images otherwise (:func:`_preparation_notes`).

    Raises:
        LeukolabError: ``path`` is missing, not a checkpoint leukolab can load, or an adapter run.
    """
    path = Path(path).resolve()
    loaded, obj = _load(path, allow_pickle)
    if loaded.spec is not None and ("backbone_spec" in obj or not isinstance(obj.get("backbone_config"), Mapping)):
        builder, name, kwargs = "timm", loaded.spec.name, dict(loaded.spec.kwargs)
    elif isinstance(obj.get("backbone_config"), Mapping):  # converted before backbone_spec existed
        builder, name, kwargs = "vit_config", loaded.name, dict(obj["backbone_config"])
    else:  # a raw ViT file: its inferred architecture
        from leukolab.zoo import infer_vit_config, load_state_dict_file

        builder, name = "vit_config", loaded.name
        kwargs = infer_vit_config(load_state_dict_file(path, allow_pickle=allow_pickle), None)
    mean, std = mean_std(loaded.normalisation)
    with torch.no_grad():  # one image through it: pooled (1, C) features, before anything is written
        out = loaded.model.eval()(torch.zeros(1, 3, loaded.img_size, loaded.img_size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LeukolabError(f"--fuse {path}: its {loaded.name} gives {shape} instead of pooled (N, C) features; "
                            "expected a classification or pretraining backbone")
    width = int(out.shape[1])
    record = EncoderRecord(source=str(path), kind=loaded.kind, name=name, builder=builder, kwargs=kwargs,
                           img_size=int(loaded.img_size), mean=list(mean), std=list(std), num_features=int(width),
                           notes=list(loaded.notes))
    if data is not None and loaded.kind == "classification":
        record.notes += _preparation_notes(obj.get("config"), data)
    return record, loaded.model


def _norm_label(mean: Sequence[float], std: Sequence[float]) -> str:
    """``leukolab`` / ``imagenet (mean (..) std (..))`` / ``mean (..) std (..)``."""
    from leukolab.data.transforms import NORMALISATIONS
    from leukolab.models.loading import describe_normalisation

    numbers = describe_normalisation((tuple(mean), tuple(std)))
    for name, (m, s) in NORMALISATIONS.items():
        if all(abs(a - b) < 1e-6 for a, b in zip((*m, *s), (*mean, *std), strict=True)):
            return f"{name} ({numbers})"
    return numbers


def _describe(record: EncoderRecord, shared: int) -> None:
    """Add to ``record.notes`` what the fusion does to its input (shared: ``shared`` px, leukolab's statistics)."""
    if record.img_size != shared:
        record.notes.append(f"input resized from the shared {shared} px to its own {record.img_size} px")
    own = (*record.mean, *record.std)
    if any(abs(a - b) > 1e-6 for a, b in zip(own, (*LEUKOLAB_MEAN, *LEUKOLAB_STD), strict=True)):
        record.notes.append(f"input renormalised from {_norm_label(LEUKOLAB_MEAN, LEUKOLAB_STD)} to its own "
                            f"{_norm_label(record.mean, record.std)}")


#: a classifier run's recorded image preparation that a fusion run applies once, for all encoders alike
_PREPARATION = (("crop", "none", "--crop"), ("stain_norm", "none", "--stain-norm"))


def _preparation_notes(config: Any, data: Mapping[str, Any]) -> list[str]:
    """Where a source classifier run (``config``: its checkpoint's config) prepared its images otherwise than
    this fusion run will (cell crop, stain normalisation: applied once to the shared input, for every encoder)."""
    trained = (config.get("data") if isinstance(config, Mapping) else None) or {}
    notes = []
    for key, default, option in _PREPARATION:
        theirs, ours = str(trained.get(key) or default), str(data.get(key) or default)
        if theirs != ours:
            notes.append(f"trained with {option} {theirs}, fed {option} {ours} here (this run's {option} applies "
                         "to every encoder)")
    return notes


def prepare_fusion(cfg: dict[str, Any], allow_pickle: bool = False) -> list[EncoderRecord]:
    """Resolve a new run's ``model.fuse`` in place (see the module docstring); returns the records.

    Nothing happens without ``model.fuse`` entries (``[]``: an ordinary run).

    Raises:
        LeukolabError: a bad ``fuse_norm``, ``--init`` or ``--adapter`` with ``--fuse``, or an entry
            that is not a run or checkpoint leukolab can load.
    """
    m, d = cfg["model"], cfg["data"]
    fuse = _fuse_list(m.get("fuse"))
    if not fuse:
        return []
    norm = str(m.get("fuse_norm") or "none")
    if norm not in FEATURE_NORMS:
        raise LeukolabError(f"--fuse-norm {norm!r}: expected one of {', '.join(FEATURE_NORMS)}")
    if m.get("init"):
        raise LeukolabError(f"--init {m['init']} and --fuse: the fused encoders are the weights; expected one of them")
    if (cfg.get("adapter") or {}).get("name"):
        raise LeukolabError("--adapter and --fuse: fusion encoders are frozen as they are; expected one of them")
    records = [load_encoder(p, allow_pickle, data=d)[0] for p in fuse]
    shared = max(r.img_size for r in records)
    for r in records:
        _describe(r, shared)
    m["fuse"] = [r.source for r in records]
    m["fuse_norm"] = norm
    m["backbone"] = "fusion"
    m["backbone_kwargs"] = {"encoders": [r.to_dict() for r in records], "norm": norm}
    m["freeze_backbone"] = True
    d["img_size"] = shared
    if distributed.is_main():
        print(f"fusion of {len(records)} frozen encoder(s), shared input {shared} px (the largest encoder's), "
              f"features normalised per encoder: {norm}", flush=True)
        for r in records:
            notes = "; ".join(r.notes) or "input as it is"
            print(f"  {r.source}: {r.name} ({r.kind}), {r.img_size} px, {r.num_features} features; {notes}",
                  flush=True)
    return records


def load_fusion_weights(model: Classifier, allow_pickle: bool = False) -> None:
    """Load every encoder of ``model``'s :class:`FusionBackbone` from the source its record names (strictly).

    Raises:
        LeukolabError: a source that is gone or no longer fits its record.
    """
    backbone = model.backbone
    if not isinstance(backbone, FusionBackbone):
        raise LeukolabError("load_fusion_weights needs a classifier on the fusion backbone")
    for fused in backbone.encoders:
        record = fused.record
        _, source = load_encoder(record.source, allow_pickle)
        try:
            fused.encoder.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise LeukolabError(f"--fuse {record.source}: its weights no longer fit the recorded {record.name} "
                                f"({first})") from None
        fused.encoder.requires_grad_(False).eval()
    # a fresh rebuild check: the run's evaluate builds the encoders from the records alone
    for fused in backbone.encoders:
        rebuilt = build_encoder(fused.record)
        if set(rebuilt.state_dict()) != set(fused.encoder.state_dict()):
            raise LeukolabError(f"--fuse {fused.record.source}: its {fused.record.name} cannot be rebuilt from its "
                                "record; expected a timm backbone or a ViT")


def cache_blockers(cfg: dict[str, Any]) -> list[str]:
    """Why features cannot be cached for this run (empty: they can): randomness below the head."""
    d = cfg["data"]
    reasons = []
    if not cfg["model"].get("fuse_cache", True):
        reasons.append("model.fuse_cache is false")
    if d.get("augment"):
        reasons.append("augment is on")
    reasons += [f"{key} is {d[key]}" for key in _RANDOM_DATA_OPTIONS if float(d.get(key) or 0) > 0]
    if MixConfig.from_config(cfg.get("mix")).enabled:
        reasons.append("MixUp/CutMix is on")
    return reasons


class _Features(Dataset):
    """Cached ``(features, target)`` pairs in the order of the dataset they were computed from."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.targets[i]


@torch.no_grad()
def encode_dataset(backbone: nn.Module, loader: DataLoader, device: torch.device, show_progress: bool = False,
                   desc: str = "caching features") -> _Features:
    """The features ``backbone`` gives every item of ``loader``'s dataset, in dataset order."""
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=False,
                         collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    backbone.eval()
    feats, targets = [], []
    for x, y in progress(ordered, desc, enable=show_progress, total=len(ordered)):
        feats.append(backbone(move_to(x, device)).float().cpu())
        targets.append(torch.as_tensor(y))
    return _Features(torch.cat(feats), torch.cat(targets))


def _rebind(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A loader over ``dataset`` drawing exactly the batches ``loader`` draws (its sampler and generator)."""
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
                      generator=loader.generator, num_workers=0)


def fusion_loaders(
    cfg: dict[str, Any], model: Classifier, train_loader: DataLoader, val_loader: DataLoader | None,
) -> tuple[DataLoader, DataLoader | None]:
    """The loaders a fusion run trains on: over cached features when :func:`cache_blockers` finds nothing,
    else ``train_loader`` and ``val_loader`` as they are (features computed on the fly)."""
    reasons = cache_blockers(cfg)
    show = bool(cfg["train"].get("progress", True)) and distributed.is_main()
    if reasons:
        if distributed.is_main():
            print(f"fusion: features computed on the fly ({'; '.join(reasons)})", flush=True)
        return train_loader, val_loader
    device = pick_device(cfg["train"].get("device", "auto"))
    backbone = model.backbone.to(device)
    train = _rebind(train_loader, encode_dataset(backbone, train_loader, device, show, "caching train features"))
    val = None
    if val_loader is not None:
        val = _rebind(val_loader, encode_dataset(backbone, val_loader, device, show, "caching val features"))
    if distributed.is_main():
        n = len(train.dataset) + (len(val.dataset) if val is not None else 0)  # type: ignore[arg-type]
        print(f"fusion: features of {n} images cached once; the head trains on them", flush=True)
    return train, val
