"""Image embeddings from any backbone leukolab can load (the ``embed`` command and the ``viz`` helpers).

:func:`load_model_for_embedding` turns a model argument into a headless
backbone, whatever it is:

* a leukolab classification run folder or its ``best.pt`` / ``last.pt``
  (``config`` with ``model.backbone``, ``model.backbone_kwargs`` and
  ``data.img_size``, plus ``backbone``, the timm state dict);
* a leukolab pretraining run folder or checkpoint (``backbone``,
  ``backbone_name``, ``img_size``, ``backbone_kwargs``);
* a backbone converted by ``leukolab convert``
  (``{"backbone": ..., "backbone_config": ...}``, see :mod:`leukolab.zoo.convert`);
* a raw DINOv2 / DinoBloom / timm / HF-ViTMAE ViT checkpoint, built by
  :func:`leukolab.zoo.convert.build_vit_from_checkpoint` at ``img_size``
  (default 224).

:func:`embed_dataset` writes one row per image: the class token (``cls``),
the mean of the patch tokens (``mean``) or both concatenated (``both``) of a
ViT's final, normalised tokens; other backbones give their pooled features.
Images are prepared with :func:`leukolab.data.transforms.eval_transform`:
resized, then normalised the way the model was trained -- leukolab's own
statistics for leukolab checkpoints, ImageNet's for converted or raw external
weights (DINOv2 / DinoBloom); ``norm`` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from leukolab.data.dataset import ImageDataset, load_rgb
from leukolab.data.readers import RESERVED_DIRS, expand_image_inputs, is_image_file, list_images, read_labelled
from leukolab.data.transforms import check_normalisation, eval_transform
from leukolab.errors import LeukolabError
from leukolab.evaluation.features import FEATURE_SUFFIXES, FeatureSet, save_features
from leukolab.models.backbones import create_backbone, is_vit
from leukolab.models.weights import (
    backbone_spec_of,
    load_backbone_weights,
    read_checkpoint,
    resolve_checkpoint_path,
)
from leukolab.utils.progress import progress as progress_bar

__all__ = [
    "POOLS",
    "check_layer",
    "collect_images",
    "embed_dataset",
    "embed_paths",
    "expand_image_inputs",
    "load_image_batch",
    "load_model_for_embedding",
    "pool_features",
]

#: pooling modes of :func:`pool_features`
POOLS = ("cls", "mean", "both")
#: image size of raw external checkpoints when none is given
DEFAULT_RAW_IMG_SIZE = 224


# --------------------------------------------------------------------------------------
# Loading a backbone
# --------------------------------------------------------------------------------------


def _check_patch_multiple(model: nn.Module, img_size: int, where: str) -> None:
    if not is_vit(model):
        return
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if img_size % ph or img_size % pw:
        raise LeukolabError(f"image size {img_size} is not a multiple of {where}'s patch size {ph}")


def load_model_for_embedding(
    model: Path | str, img_size: int | None = None, *, num_heads: int | None = None, norm: str | None = None
) -> tuple[nn.Module, int, dict[str, Any]]:
    """A headless backbone in eval mode, the image size to feed it, and what was loaded.

    Args:
        model: run folder, leukolab checkpoint, converted backbone or raw ViT file.
        img_size: input size; default the checkpoint's own (224 for raw files).
            ViTs are rebuilt for it (position embedding resampled); it must be
            a multiple of the patch size.
        num_heads: head count of a raw ViT checkpoint (only needed for
            non-standard widths).
        norm: input normalisation (``leukolab`` or ``imagenet``); default the
            checkpoint's (``imagenet`` for converted and raw external weights).

    Returns:
        ``(backbone, img_size, meta)`` with ``meta`` holding ``kind`` (the
        checkpoint's ``task``, e.g. ``classification``; ``pretrain`` when a
        pretraining checkpoint names none; ``run`` for other leukolab
        checkpoints; ``converted`` or ``raw``),
        ``checkpoint``, ``backbone``, ``img_size``, ``vit``, ``normalisation`` and ``notes``.

    Raises:
        LeukolabError: missing or unreadable file, unknown layout, weights
            that do not fit, or an image size the ViT cannot take.
    """
    if img_size is not None and (isinstance(img_size, bool) or int(img_size) <= 0):
        raise LeukolabError(f"--img-size {img_size!r} must be a positive integer")
    path = Path(model)
    if not path.exists():
        raise LeukolabError(f"model {path} does not exist; expected a run folder or checkpoint file")
    ckpt = resolve_checkpoint_path(path)
    notes: list[str] = []
    if ckpt.suffix == ".safetensors":
        obj: dict[str, Any] = {}
    else:
        obj = read_checkpoint(ckpt)

    if isinstance(obj.get("backbone"), dict) and isinstance(obj.get("backbone_config"), dict):
        from leukolab.zoo.convert import load_converted_backbone, vit_from_config

        config = dict(obj["backbone_config"])
        native = int(config.get("img_size") or DEFAULT_RAW_IMG_SIZE)
        size = int(img_size or native)
        if size == native:
            backbone, config = load_converted_backbone(ckpt)
        else:
            _check_vit_config_size(config, size, ckpt)
            backbone = vit_from_config(config, img_size=size)
            load_backbone_weights(backbone, ckpt)
            notes.append(f"position embedding resampled from {native} to {size} px")
        kind, name = "converted", f"vit (converted {obj.get('format', '?')})"
    elif spec := backbone_spec_of(obj):
        name, native, kwargs = spec["backbone"], spec["img_size"], spec["backbone_kwargs"]
        task = str(obj.get("task") or ("pretrain" if isinstance(obj.get("backbone_name"), str) else "run"))
        size = int(img_size or native or 0)
        if not size:
            raise LeukolabError(f"{ckpt}: the checkpoint does not record its image size; pass --img-size")
        backbone = create_backbone(name, size, **kwargs)
        if not isinstance(obj.get("backbone"), dict):
            raise LeukolabError(f"{ckpt}: no 'backbone' weights in this checkpoint; expected a leukolab run")
        load_backbone_weights(backbone, ckpt)
        kind = task
        if native and size != native:
            notes.append(f"built at {size} px instead of the checkpoint's {native} px")
    else:
        from leukolab.zoo.convert import build_vit_from_checkpoint

        size = int(img_size or DEFAULT_RAW_IMG_SIZE)
        backbone, report = build_vit_from_checkpoint(ckpt, size, num_heads=num_heads)
        notes.extend(report.notes)
        notes.extend(report.resized)
        kind, name = "raw", "vit (external checkpoint)"
    _check_patch_multiple(backbone, size, str(ckpt))
    backbone.eval()
    meta = {
        "kind": kind,
        "checkpoint": str(ckpt),
        "backbone": name,
        "img_size": size,
        "vit": is_vit(backbone),
        "num_prefix_tokens": int(getattr(backbone, "num_prefix_tokens", 0) or 0) if is_vit(backbone) else 0,
        "num_reg_tokens": int(getattr(backbone, "num_reg_tokens", 0) or 0) if is_vit(backbone) else 0,
        "notes": notes,
        # how the weights expect their inputs: external (converted / raw) weights come from ImageNet training
        "normalisation": obj.get("normalisation") or ("leukolab" if kind not in ("converted", "raw") else "imagenet"),
    }
    if norm is not None:
        meta["normalisation"] = check_normalisation(norm)
    return backbone, size, meta


def _check_vit_config_size(config: dict[str, Any], size: int, ckpt: Path) -> None:
    patch = config.get("patch_size", 16)
    sides = [patch, patch] if isinstance(patch, int) else list(patch)
    if any(size % int(p) for p in sides):
        raise LeukolabError(f"image size {size} is not a multiple of {ckpt}'s patch size {sides[0]}")


# --------------------------------------------------------------------------------------
# Which images
# --------------------------------------------------------------------------------------


def _has_class_folders(folder: Path) -> bool:
    return any(
        d.is_dir() and not d.name.startswith(".") and d.name not in RESERVED_DIRS and any(
            is_image_file(p) for p in d.rglob("*")
        )
        for d in folder.iterdir()
    )


def collect_images(data: Path | str, labels: bool = True) -> tuple[list[Path], list[str] | None, pd.DataFrame]:
    """The images of one data set: paths, labels (``None`` when unlabelled) and metadata.

    A folder of class folders (or one with ``train/val/test`` splits) and a
    ``path,label[,split]`` CSV are read with
    :func:`~leukolab.data.readers.read_labelled` (all splits, in order); a
    folder of images without class folders, or a CSV with a ``path`` but no
    ``label`` column, is unlabelled. ``labels=False`` ignores labels. The
    metadata has a ``source`` column (the folder name, or the CSV's stem) and,
    for split data, a ``split`` column.
    """
    data = Path(data)
    if not data.exists():
        raise LeukolabError(f"{data} does not exist; expected an image folder or a path,label CSV file")
    source = data.stem if data.is_file() else data.resolve().name
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise LeukolabError(f"{data}: expected a folder of images or a .csv file")
        try:
            columns = pd.read_csv(data, nrows=0).columns
        except Exception as exc:
            raise LeukolabError(f"{data}: not a readable CSV file ({exc.__class__.__name__})") from None
        if "label" not in columns or not labels:
            if "path" not in columns:
                raise LeukolabError(f"{data}: no 'path' column; expected columns path[,label[,split]]")
            frame = pd.read_csv(data)
            paths = [Path(p) if Path(p).is_absolute() else data.parent / p for p in frame["path"].astype(str)]
            absent = [p for p in paths if not p.is_file()]
            if absent:
                raise LeukolabError(f"{data}: image {absent[0]} does not exist ({len(absent)} missing in all)")
            return paths, None, pd.DataFrame({"source": [source] * len(paths)})
    elif not labels or not _has_class_folders(data):
        paths = list_images(data)
        paths = [p for p in paths if not set(p.relative_to(data).parts[:-1]) & RESERVED_DIRS]
        if not paths:
            raise LeukolabError(f"{data}: folder holds no images; expected .png/.jpg/.tif ... files")
        return paths, None, pd.DataFrame({"source": [source] * len(paths)})
    parts = read_labelled(data, min_classes=1)
    paths: list[Path] = []
    label_list: list[str] = []
    splits: list[str] = []
    for split, part in parts.items():
        paths += list(part.paths)
        label_list += list(part.labels)
        splits += [split] * len(part)
    extra = {"source": [source] * len(paths)}
    if set(parts) != {"all"}:
        extra["split"] = splits
    return paths, label_list, pd.DataFrame(extra)


def load_image_batch(paths: Sequence[Path], img_size: int, norm: str = "leukolab") -> torch.Tensor:
    """``(B, 3, img_size, img_size)`` model inputs of ``paths`` (normalised like training)."""
    tf = eval_transform(img_size, norm)
    return torch.stack([tf(load_rgb(Path(p))) for p in paths])


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------


def check_layer(model: nn.Module, layer: int) -> int:
    """The block index (0-based) that ``layer`` names; negative counts from the last block."""
    depth = len(getattr(model, "blocks", []))
    if isinstance(layer, bool) or not -depth <= int(layer) < depth:
        raise LeukolabError(f"--layer {layer!r}: this ViT has {depth} blocks; expected -{depth} .. {depth - 1}")
    return int(layer) % depth


def pool_features(
    model: nn.Module, x: torch.Tensor, pool: str = "cls", layer: int = -1, final_norm: bool = True
) -> torch.Tensor:
    """``(B, D)`` (``(B, 2D)`` for ``both``) embeddings of a batch.

    ViTs: the tokens after block ``layer`` (default the last), passed through
    the model's final LayerNorm unless ``final_norm`` is false (then the raw
    residual stream, as timm's ``forward_intermediates(norm=False)`` gives
    it). The first ``num_prefix_tokens`` are the class (and register) tokens,
    the rest the patches. ``cls`` takes the class token, ``mean`` averages the
    patch tokens, ``both`` concatenates the two. Other backbones: their pooled
    features (``model(x)``), whatever ``pool``, ``layer`` and ``final_norm`` say.
    """
    if pool not in POOLS:
        raise LeukolabError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    if not is_vit(model):
        return model(x).flatten(1)
    has_cls = getattr(model, "cls_token", None) is not None
    if pool in ("cls", "both") and not has_cls:
        raise LeukolabError("this ViT has no class token; use --pool mean")
    index = check_layer(model, layer)
    if index == len(model.blocks) - 1 and final_norm:
        tokens = model.forward_features(x)
        n_prefix = int(getattr(model, "num_prefix_tokens", 1) or 0)
        prefix, patches = tokens[:, :n_prefix], tokens[:, n_prefix:]
    else:
        ((patches, prefix),) = model.forward_intermediates(
            x, indices=[index], norm=final_norm, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=True,
        )
    out = []
    if pool in ("cls", "both"):
        out.append(prefix[:, 0])
    if pool in ("mean", "both"):
        out.append(patches.mean(dim=1))
    return torch.cat(out, dim=1)


@torch.inference_mode()
def embed_paths(
    model: nn.Module,
    paths: Sequence[Path],
    img_size: int,
    pool: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    norm: str = "leukolab",
    layer: int = -1,
    final_norm: bool = True,
) -> np.ndarray:
    """``(N, D)`` float32 embeddings of image files, in order (see :func:`pool_features`)."""
    if batch_size < 1:
        raise LeukolabError(f"--batch-size {batch_size} must be at least 1")
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(ImageDataset(list(paths), None, eval_transform(img_size, norm)), batch_size=batch_size)
    chunks = []
    for x, _ in progress_bar(loader, desc="embedding", enable=show_progress, total=len(loader)):
        chunks.append(pool_features(model, x.to(device), pool, layer, final_norm).float().cpu().numpy())
    if not chunks:
        raise LeukolabError("no images to embed")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def check_features_out(out: Path) -> Path:
    """Refuse an existing output file or an unknown suffix before any work is done."""
    out = Path(out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise LeukolabError(f"--out {out}: unknown features file suffix; expected .npz or .parquet")
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it (choose another output path)")
    return out


def reinitialise(backbone: nn.Module, seed: int = 0) -> None:
    """Replace every weight of ``backbone`` by its architecture's own random initialisation."""
    torch.manual_seed(seed)
    if callable(getattr(backbone, "init_weights", None)):  # timm ViTs: pos-embed, tokens and blocks
        backbone.init_weights()
        return
    for module in backbone.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def embed_dataset(
    model: Path | str,
    data: Sequence[Path | str] | Path | str,
    out: Path | str,
    pool: str = "cls",
    img_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    show_progress: bool = True,
    labels: bool = True,
    num_heads: int | None = None,
    random_init: bool = False,
    seed: int = 0,
    norm: str | None = None,
    layer: int = -1,
    final_norm: bool = True,
) -> tuple[Path, FeatureSet, dict[str, Any]]:
    """Embed every image of one or more data sets and write a features file.

    ``layer`` (a ViT block index, negative from the end) and ``final_norm``
    choose which tokens are pooled (see :func:`pool_features`): a masked
    autoencoder with a shallow decoder spends its last blocks on pixel
    reconstruction, so its earlier or un-normalised tokens can be the better
    embedding.

    ``random_init`` keeps the model's architecture but replaces its weights by a
    fresh random initialisation (seeded by ``seed``): the floor a pretrained
    backbone must clear in ``probe``.

    Paths are stored absolute. Returns ``(out, features, meta)``; ``meta`` is that of
    :func:`load_model_for_embedding` plus ``pool``. When some data set has
    no labels the features are unlabelled. Raises :class:`LeukolabError`
    when ``out`` exists (checked before anything is computed).
    """
    from leukolab.training.loop import pick_device

    out = check_features_out(Path(out))
    if pool not in POOLS:
        raise LeukolabError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    if not sources:
        raise LeukolabError("no DATA given; expected an image folder or a CSV")
    all_paths: list[Path] = []
    all_labels: list[str] | None = []
    extras = []
    for src in sources:
        paths, lab, extra = collect_images(src, labels=labels)
        all_paths += paths
        extras.append(extra)
        if lab is None or all_labels is None:
            all_labels = None
        else:
            all_labels += lab
    extra = pd.concat(extras, ignore_index=True)
    if "split" in extra.columns:
        extra["split"] = extra["split"].fillna("all")
    backbone, size, meta = load_model_for_embedding(model, img_size, num_heads=num_heads, norm=norm)
    if random_init:
        reinitialise(backbone, seed)
        meta["backbone"] += " (random init)"
        meta["notes"].append(f"weights of {meta['checkpoint']} replaced by a random initialisation (seed {seed})")
    if not meta["vit"] and pool != "cls":
        meta["notes"].append(f"--pool {pool} ignored: {meta['backbone']} is not a ViT, its pooled features are used")
    if meta["vit"]:
        layer = check_layer(backbone, layer)  # before any image is read
    elif layer != -1 or not final_norm:
        meta["notes"].append(f"--layer / --no-final-norm ignored: {meta['backbone']} is not a ViT")
    feats = embed_paths(backbone, all_paths, size, pool, batch_size, pick_device(device), show_progress,
                        meta["normalisation"], layer, final_norm)
    fs = FeatureSet(feats, [str(p.resolve()) for p in all_paths], all_labels, extra)
    save_features(fs, out)
    meta["pool"] = pool if meta["vit"] else "pooled"
    default_tokens = not meta["vit"] or (layer == len(backbone.blocks) - 1 and final_norm)
    meta["layer"], meta["final_norm"] = (None, None) if default_tokens else (layer, final_norm)
    return out, fs, meta


# --------------------------------------------------------------------------------------
# Probing a features file
# --------------------------------------------------------------------------------------


def _select(fs: FeatureSet, spec: str, role: str, feats_path: Path) -> FeatureSet:
    """A features file, or the rows of ``fs`` whose ``split`` or ``source`` column equals ``spec``."""
    from leukolab.evaluation.features import load_features

    candidate = Path(spec)
    if candidate.suffix.lower() in FEATURE_SUFFIXES and candidate.is_file():
        return load_features(candidate)
    columns = [c for c in ("split", "source") if fs.extra is not None and c in fs.extra.columns]
    for col in columns:
        values = fs.extra[col].astype(str)
        if (values == spec).any():
            return fs.subset(np.flatnonzero(values.to_numpy() == spec))
    known = sorted({str(v) for c in columns for v in fs.extra[c].astype(str).unique()})
    hint = f"a value of its split/source column ({', '.join(known[:8])})" if known else "a features file"
    raise LeukolabError(f"--{role} {spec!r}: not a features file and not found in {feats_path}; expected {hint}")


def probe_features(
    feats: Path | str,
    folds: int = 5,
    seed: int = 0,
    train: str | None = None,
    test: str | None = None,
    out: Path | str | None = None,
    ks: Sequence[int] = (1, 20),
    show_progress: bool = True,
    n_jobs: int | None = None,
    knn_standardise: bool = False,
) -> tuple[Path, str]:
    """kNN and linear probes of a features file; writes ``probe.csv`` and ``probe.md`` into a new folder.

    Without ``train``/``test``: stratified ``folds``-fold cross-validation.
    With both: fit on ``train`` and score on ``test``, each a features file or
    a value of the ``split`` (or ``source``) column of ``feats``. The folder
    is ``out`` (uniquified: ``out-2``, ...) or ``FEATS_stem-probe`` next to
    ``feats``. Returns ``(folder, markdown text)``.
    """
    from leukolab.evaluation.features import load_features
    from leukolab.evaluation.probe import cross_validate_probes, evaluate_fixed_split, summarise, to_markdown
    from leukolab.utils.runs import unique_child

    feats = Path(feats)
    fs = load_features(feats)
    if (train is None) != (test is None):
        raise LeukolabError("give both --train and --test, or neither (then the probes are cross-validated)")
    if train is not None and test is not None:
        train_fs, test_fs = _select(fs, train, "train", feats), _select(fs, test, "test", feats)
        results = evaluate_fixed_split(train_fs, test_fs, seed=seed, ks=ks, progress=show_progress, n_jobs=n_jobs,
                                       knn_standardise=knn_standardise)
        how = f"fit on {train} ({len(train_fs)} rows), scored on {test} ({len(test_fs)} rows), seed {seed}"
        classes = train_fs.classes
    else:
        results = cross_validate_probes(fs, folds=folds, seed=seed, ks=ks, progress=show_progress, n_jobs=n_jobs,
                                        knn_standardise=knn_standardise)
        how = f"stratified {folds}-fold cross-validation, seed {seed}"
        classes = fs.classes
    table = to_markdown(summarise(results))
    out_dir = (
        unique_child(feats.parent, f"{feats.stem}-probe") if out is None else unique_child(Path(out).parent,
                                                                                             Path(out).name)
    )
    results.to_csv(out_dir / "probe.csv", index=False)
    text = (
        f"# Probes of {feats.name}\n\n"
        f"{len(fs)} rows, {fs.dim} dimensions, {len(classes)} classes; {how}. "
        "Metrics in percent, mean (± std over folds).\n\n" + table
    )
    (out_dir / "probe.md").write_text(text, encoding="utf-8")
    return out_dir, table


# --------------------------------------------------------------------------------------
# Visual diagnostics of a ViT
# --------------------------------------------------------------------------------------


def _require_vit_meta(meta: dict[str, Any], what: str) -> None:
    if not meta["vit"]:
        raise LeukolabError(f"{what} needs a Vision Transformer; {meta['checkpoint']} holds {meta['backbone']}")


def _unique_names(paths: Sequence[Path], suffix: str) -> list[str]:
    names, seen = [], set()
    for p in paths:
        base, k = f"{p.stem}{suffix}", 2
        name = base
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        names.append(name + ".png")
    return names


def attention_figures(
    model: Path | str,
    images: Sequence[Path | str],
    out_dir: Path | str,
    img_size: int | None = None,
    limit: int | None = 16,
    batch_size: int = 8,
    num_heads: int | None = None,
    norm: str | None = None,
) -> list[Path]:
    """One attention grid PNG per image in ``out_dir`` (see :func:`leukolab.evaluation.attention.attention_maps`)."""
    from leukolab.data.transforms import denormalise
    from leukolab.evaluation.attention import attention_maps, plot_attention_grid, prefix_token_names

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LeukolabError(f"--out {out_dir} is a file; expected a folder for the PNGs")
    paths = expand_image_inputs(images, limit)
    targets = [out_dir / n for n in _unique_names(paths, "_attention")]
    taken = [t for t in targets if t.exists()]
    if taken:
        raise LeukolabError(f"{taken[0]} already exists; refusing to overwrite it (choose another --out folder)")
    backbone, size, meta = load_model_for_embedding(model, img_size, num_heads=num_heads, norm=norm)
    _require_vit_meta(meta, "attention maps")
    names = prefix_token_names(backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        x = load_image_batch(chunk, size, meta["normalisation"])
        maps = attention_maps(backbone, x)
        for i, p in enumerate(chunk):
            target = targets[start + i]
            plot_attention_grid(denormalise(x[i], meta["normalisation"]), maps[i], target, names,
                                title=f"{p.name}: last-block attention to patches (bracket: share on patches)")
            written.append(target)
    return written


def pca_figure(
    model: Path | str,
    images: Sequence[Path | str],
    out: Path | str,
    img_size: int | None = None,
    limit: int | None = 16,
    threshold: float | None = 0.5,
    batch_size: int = 8,
    num_heads: int | None = None,
    norm: str | None = None,
) -> Path:
    """One grid PNG: each image next to the first 3 PCA components of its patch features as RGB."""
    from leukolab.data.transforms import denormalise
    from leukolab.evaluation.attention import patch_features, pca_rgb, plot_pca_grid

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise LeukolabError(f"--out {out}: expected a .png file")
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise LeukolabError(f"--threshold {threshold}: expected a value in [0, 1)")
    paths = expand_image_inputs(images, limit)
    backbone, size, meta = load_model_for_embedding(model, img_size, num_heads=num_heads, norm=norm)
    _require_vit_meta(meta, "PCA of patch features")
    feats, shown = [], []
    for start in range(0, len(paths), batch_size):
        x = load_image_batch(paths[start : start + batch_size], size, meta["normalisation"])
        feats.append(patch_features(backbone, x))
        shown += [denormalise(img, meta["normalisation"]) for img in x]
    rgb, _ = pca_rgb(torch.cat(feats), threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_pca_grid(shown, rgb, out, [p.name for p in paths])
