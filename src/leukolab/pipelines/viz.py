"""The ``viz`` recipes: 2-D maps of a features file, attention maps and patch-feature PCA of a ViT.

Figures are drawn by :mod:`leukolab.evaluation.attention` and
:mod:`leukolab.evaluation.umap_plot`; these recipes read the inputs, check
the outputs before any work is done (nothing is overwritten) and feed the
images through the model the way it was trained -- a classifier run's images
with its recorded preprocessing (cell crop, stain normalisation) as ``evaluate``
applies it (:meth:`~leukolab.models.loading.LoadedBackbone.input_transform`); the
figures show the images as the model saw them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leukolab.data.embed import load_image_batch
from leukolab.data.readers import expand_image_inputs
from leukolab.data.transforms import denormalise
from leukolab.errors import LeukolabError
from leukolab.evaluation.attention import attention_maps, pca_rgb, plot_attention_grid, plot_pca_grid
from leukolab.evaluation.features import load_features
from leukolab.evaluation.umap_plot import METHODS, embedding_plot
from leukolab.models.loading import LoadedBackbone, load_any_backbone
from leukolab.models.tokens import patch_features, prefix_token_names

__all__ = ["ViewOptions", "attention_figures", "embedding_map", "pca_figure"]


@dataclass
class ViewOptions:
    """Which images and how the model sees them (``viz attention`` and ``viz pca``).

    Attributes:
        img_size: input size; default the checkpoint's (224 for raw files).
        norm: input normalisation name; default the checkpoint's.
        num_heads: head count of a raw ViT of unusual width.
        allow_pickle: read model files that hold pickled Python objects.
        limit: at most this many images (``None``: all).
        batch_size: images per forward pass.
    """

    img_size: int | None = None
    norm: str | None = None
    num_heads: int | None = None
    allow_pickle: bool = False
    limit: int | None = 16
    batch_size: int = 8


def embedding_map(
    feats: Path | str,
    out: Path | str | None = None,
    color_by: str = "label",
    method: str = "umap",
    seed: int = 0,
    normalise: bool = True,
) -> tuple[Path, Path]:
    """A 2-D map of a features file: ``(png, html)``; default ``FEATS_stem-METHOD-map.png`` next to ``feats``."""
    if method not in METHODS:
        raise LeukolabError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    feats = Path(feats)
    out = feats.parent / f"{feats.stem}-{method}-map.png" if out is None else Path(out)
    fs = load_features(feats)
    return embedding_plot(fs, out, color_by=color_by, method=method, seed=seed, normalise=normalise)


def _load_vit(model: Path | str, opts: ViewOptions, what: str) -> LoadedBackbone:
    loaded = load_any_backbone(model, opts.img_size, num_heads=opts.num_heads, norm=opts.norm,
                               allow_pickle=opts.allow_pickle, run_preprocessing=True)
    if not loaded.vit:
        raise LeukolabError(f"{what} needs a Vision Transformer; {loaded.checkpoint} holds {loaded.name}")
    return loaded


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


def _batches(paths: Sequence[Path], size: int) -> list[tuple[int, Sequence[Path]]]:
    if size < 1:
        raise LeukolabError(f"--batch-size {size} must be at least 1")
    return [(start, paths[start : start + size]) for start in range(0, len(paths), size)]


def attention_figures(
    model: Path | str, images: Sequence[Path | str], out_dir: Path | str, options: ViewOptions | None = None
) -> list[Path]:
    """One attention grid PNG per image in ``out_dir`` (see :func:`leukolab.evaluation.attention.attention_maps`)."""
    opts = options or ViewOptions()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LeukolabError(f"--out {out_dir} is a file; expected a folder for the PNGs")
    paths = expand_image_inputs(images, opts.limit)
    targets = [out_dir / n for n in _unique_names(paths, "_attention")]
    taken = [t for t in targets if t.exists()]
    if taken:
        raise LeukolabError(f"{taken[0]} already exists; refusing to overwrite it (choose another --out folder)")
    loaded = _load_vit(model, opts, "attention maps")
    names = prefix_token_names(loaded.model)
    written = []
    for start, chunk in _batches(paths, opts.batch_size):
        x = load_image_batch(chunk, loaded.img_size, loaded.normalisation, loaded.input_transform())
        maps = attention_maps(loaded.model, x)
        for i, p in enumerate(chunk):
            written.append(plot_attention_grid(
                denormalise(x[i], loaded.normalisation), maps[i], targets[start + i], names,
                title=f"{p.name}: last-block attention to patches (bracket: share on patches)",
            ))
    return written


def pca_figure(
    model: Path | str,
    images: Sequence[Path | str],
    out: Path | str,
    threshold: float | None = 0.5,
    options: ViewOptions | None = None,
) -> Path:
    """One grid PNG: each image next to the first 3 PCA components of its patch features as RGB.

    ``threshold`` cuts the background on the first component (``None`` keeps every patch).
    """
    opts = options or ViewOptions()
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise LeukolabError(f"--out {out}: expected a .png file")
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise LeukolabError(f"--threshold {threshold}: expected a value in [0, 1)")
    paths = expand_image_inputs(images, opts.limit)
    loaded = _load_vit(model, opts, "PCA of patch features")
    feats, shown = [], []
    for _, chunk in _batches(paths, opts.batch_size):
        x = load_image_batch(chunk, loaded.img_size, loaded.normalisation, loaded.input_transform())
        feats.append(patch_features(loaded.model, x))
        shown += [denormalise(img, loaded.normalisation) for img in x]
    rgb, _ = pca_rgb(torch.cat(feats), threshold)
    return plot_pca_grid(shown, rgb, out, [p.name for p in paths])
