"""The ``embed`` recipe: one embedding per image of one or more data sets, into a features file.

The model is anything :func:`leukolab.models.loading.load_any_backbone`
reads (run folder, leukolab checkpoint, converted backbone, raw ViT file);
the images anything :func:`leukolab.data.embed.collect_sources` reads. Each
row is the class token (``cls``), the mean of the patch tokens (``mean``) or
both concatenated (``both``) of a ViT's tokens after a chosen block (see
:func:`leukolab.models.tokens.pool_features`); other backbones give their
pooled features. Images are resized and normalised the way the model was
trained (its checkpoint's statistics), unless ``norm`` says otherwise; a
classifier run's images first get the run's recorded preprocessing (cell crop,
stain normalisation) exactly as ``evaluate`` applies it
(:meth:`~leukolab.models.loading.LoadedBackbone.input_transform`).

Under ``torchrun --nproc_per_node N`` (or several nodes) each rank embeds its
:func:`~leukolab.training.distributed.shard` of the images and rank 0 merges
the rows in input order and writes the same file one process writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from leukolab.data.dataset import ImageDataset
from leukolab.data.embed import collect_sources
from leukolab.data.preprocess import fallbacks_reported_by_caller
from leukolab.data.transforms import Normalisation, eval_transform, model_eval_transform
from leukolab.errors import LeukolabError
from leukolab.evaluation.features import FEATURE_SUFFIXES, FeatureSet, save_features
from leukolab.models.loading import LoadedBackbone, load_any_backbone, reinitialise
from leukolab.models.tokens import check_layer, check_pool, pool_features
from leukolab.training import distributed
from leukolab.training.loop import pick_device
from leukolab.utils.progress import progress as progress_bar

__all__ = ["EmbedOptions", "EmbedResult", "check_features_out", "embed_dataset", "embed_paths"]


@dataclass
class EmbedOptions:
    """How :func:`embed_dataset` reads the model and the images and which tokens it keeps.

    Attributes:
        pool: ViT pooling, ``cls``, ``mean`` (patch tokens) or ``both``.
        layer: ViT block whose tokens are pooled (0-based; negative from the end).
        final_norm: pass the tokens through the ViT's final LayerNorm (a masked
            autoencoder with a shallow decoder spends its last blocks on pixel
            reconstruction, so its earlier or un-normalised tokens can be the
            better embedding).
        img_size: input size; default the checkpoint's (224 for raw files).
        norm: input normalisation name; default the checkpoint's.
        num_heads: head count of a raw ViT of unusual width.
        labels: read class labels from the data when it has them.
        random_init: keep the architecture but draw fresh random weights
            (seeded by ``seed``): the floor a pretrained backbone must clear.
        seed: seed of ``random_init``.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        show_progress: draw a progress bar.
        allow_pickle: read model files that hold pickled Python objects.
        preprocess: ``release`` (the weights' own evaluation recipe, e.g. DINOv2's resize 256 bicubic +
            centre crop 224) or ``resize`` (the whole image resized to ``img_size``).
    """

    pool: str = "cls"
    layer: int = -1
    final_norm: bool = True
    img_size: int | None = None
    norm: str | None = None
    num_heads: int | None = None
    labels: bool = True
    random_init: bool = False
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    show_progress: bool = True
    allow_pickle: bool = False
    preprocess: str = "release"


@dataclass
class EmbedResult:
    """What :func:`embed_dataset` wrote and how.

    ``pool`` is ``pooled`` for non-ViTs; ``layer`` and ``final_norm`` are
    ``None`` when the default tokens (last block, normalised) were used.
    """

    path: Path
    features: FeatureSet
    model: LoadedBackbone
    pool: str
    layer: int | None
    final_norm: bool | None

    @property
    def notes(self) -> list[str]:
        """Things the user should know (from loading and from the options)."""
        return self.model.notes


@torch.inference_mode()
def embed_paths(
    model: nn.Module,
    paths: Sequence[Path],
    img_size: int,
    norm: Normalisation = "leukolab",
    *,
    pool: str = "cls",
    layer: int = -1,
    final_norm: bool = True,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    transform: Any = None,
) -> np.ndarray:
    """``(N, D)`` float32 embeddings of image files, in order (see :func:`~leukolab.models.tokens.pool_features`);
    images go through ``transform`` (default: resized to ``img_size`` and normalised with ``norm``)."""
    if batch_size < 1:
        raise LeukolabError(f"--batch-size {batch_size} must be at least 1")
    device = torch.device(device)
    model = model.to(device).eval()
    tf = transform or eval_transform(img_size, norm)
    loader = DataLoader(ImageDataset(list(paths), None, tf), batch_size=batch_size)
    chunks = []
    for x, _ in progress_bar(loader, desc="embedding", enable=show_progress, total=len(loader)):
        chunks.append(pool_features(model, x.to(device), pool, layer, final_norm).float().cpu().numpy())
    if not chunks:
        raise LeukolabError("no images to embed")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def check_features_out(out: Path | str) -> Path:
    """Refuse an existing output file or an unknown suffix before any work is done."""
    out = Path(out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise LeukolabError(f"--out {out}: unknown features file suffix; expected .npz or .parquet")
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it (choose another output path)")
    return out


def embed_dataset(
    model: Path | str,
    data: Sequence[Path | str] | Path | str,
    out: Path | str,
    options: EmbedOptions | None = None,
) -> EmbedResult | None:
    """Embed every image of one or more data sets and write a new features file ``out``.

    Paths are stored absolute; the features are unlabelled when some data set
    has no labels, and carry a ``source`` (and, for split data, a ``split``)
    column. Raises :class:`LeukolabError` for bad options, an existing ``out``
    (both checked before anything is computed) and unreadable inputs. Under
    torchrun each rank embeds its shard of the images; rank 0 writes ``out`` and
    returns the result, the other ranks return ``None``.
    """
    opts = options or EmbedOptions()
    out = check_features_out(out)
    distributed.init_distributed(opts.device)
    check_pool(opts.pool)
    model_eval_transform(8, "leukolab", None, opts.preprocess)  # a bad --preprocess fails before any work
    images = collect_sources(data, labels=opts.labels)
    loaded = load_any_backbone(model, opts.img_size, num_heads=opts.num_heads, norm=opts.norm,
                               allow_pickle=opts.allow_pickle, run_preprocessing=True)
    backbone, notes = loaded.model, loaded.notes
    if opts.random_init:
        reinitialise(backbone, opts.seed)
        loaded.name += " (random init)"
        notes.append(f"weights of {loaded.checkpoint} replaced by a random initialisation (seed {opts.seed})")
    layer = opts.layer
    if not loaded.vit and opts.pool != "cls":
        notes.append(f"--pool {opts.pool} ignored: {loaded.name} is not a ViT, its pooled features are used")
    if loaded.vit:
        layer = check_layer(backbone, layer)  # before any image is read
    elif layer != -1 or not opts.final_norm:
        notes.append(f"--layer / --no-final-norm ignored: {loaded.name} is not a ViT")
    if not images.paths:
        raise LeukolabError("no images to embed")
    mine = distributed.shard(images.paths)
    with fallbacks_reported_by_caller():  # images kept whole are counted in a note below
        part = embed_paths(backbone, mine, loaded.img_size, loaded.normalisation, pool=opts.pool, layer=layer,
                           final_norm=opts.final_norm, batch_size=opts.batch_size, device=pick_device(opts.device),
                           show_progress=opts.show_progress and distributed.is_main(),
                           transform=loaded.input_transform(opts.preprocess)) if mine else np.zeros((0, 0), np.float32)
    if loaded.fallbacks:
        notes.append(f"{loaded.fallbacks} image(s) had no cell found by the run's cell crop; used whole")
    rows = distributed.gather_shards(list(part), len(images.paths))
    if rows is None:  # not rank 0: rank 0 writes
        return None
    feats = np.stack(rows).astype(np.float32, copy=False)
    fs = FeatureSet(feats, [str(p.resolve()) for p in images.paths], images.labels, images.extra)
    save_features(fs, out)
    default_tokens = not loaded.vit or (layer == len(backbone.blocks) - 1 and opts.final_norm)
    return EmbedResult(out, fs, loaded, opts.pool if loaded.vit else "pooled",
                       None if default_tokens else layer, None if default_tokens else opts.final_norm)
