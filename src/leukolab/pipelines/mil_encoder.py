"""The cell encoder of the MIL task and its embedding cache.

:func:`load_encoder` turns ``--encoder`` into a headless backbone: a leukolab
run folder or checkpoint, a converted or raw external ViT file (anything
:func:`leukolab.models.loading.load_any_backbone` reads), or a timm model name,
built with seeded random weights (the floor a trained encoder must clear), or
``morphology``: hand-crafted features of each cell's segmented nucleus and
cytoplasm (:class:`~leukolab.models.morphology.MorphologyEncoder`; no weights,
fed the un-normalised crop resized to :data:`MORPHOLOGY_SIZE`).
A classifier run's cells are prepared as ``evaluate`` prepares its images: its
recorded cell crop and stain normalisation come first
(:meth:`~leukolab.models.loading.LoadedBackbone.input_transform`).

:func:`embed_cohort` embeds every cell of a cohort once and keeps the result in
a cache folder, keyed by the encoder (its file's size and modification time,
or the timm name and seed), the input size, normalisation and pooling, and the
cells (names, sizes, modification times): a second ``mil train`` over the same
data, a cross-validation of several aggregators, or ``mil evaluate`` on the
training cohort cost no encoder pass at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from leukolab.checkpoints import BackboneSpec, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from leukolab.data.mil import Cohort
from leukolab.data.transforms import Normalisation, eval_transform, mean_std
from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone, is_vit, resolve_backbone_name
from leukolab.models.loading import load_any_backbone, reinitialise
from leukolab.models.morphology import MORPHOLOGY, MorphologyEncoder, names_morphology
from leukolab.models.tokens import pool_features
from leukolab.models.weights import checkpoint_backbone_spec
from leukolab.pipelines.embed import embed_paths

__all__ = ["DEFAULT_TIMM_SIZE", "MORPHOLOGY_SIZE", "Encoder", "embed_cohort", "load_encoder"]

#: input size of a timm-name encoder when none is given
DEFAULT_TIMM_SIZE = 64
#: input size of the morphology encoder when none is given (the public lymphocytosis crops' own size)
MORPHOLOGY_SIZE = 224
#: "normalisation" of the morphology encoder: none, it measures the crop's own colours
_RAW: Normalisation = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass
class Encoder:
    """A headless cell encoder and how to feed it.

    Attributes:
        model: the backbone (eval mode).
        img_size: its input size.
        norm: input normalisation (a name or ``(mean, std)``).
        pool: ViT token pooling (see :func:`~leukolab.models.tokens.pool_features`).
        source: what ``--encoder`` named (absolute path, or the timm name).
        kind: ``timm`` (random init), ``morphology``, or the loader's kind (``classification``,
            ``pretrain-mae``, ``converted`` ...).
        seed: seed of a random-init encoder.
        dim: embedding size.
        spec: how to rebuild the architecture, when known.
        fingerprint: identifies the weights (file size and mtime, or name and seed) and the preprocessing.
        transform: PIL image -> input tensor for a classifier run with recorded preprocessing (cell crop,
            stain normalisation); ``None``: resize to ``img_size`` and normalise with ``norm``.
        preprocessing: what ``transform`` does before the resize (``none`` without one).
    """

    model: nn.Module
    img_size: int
    norm: Normalisation
    pool: str
    source: str
    kind: str
    seed: int
    dim: int
    spec: BackboneSpec | None
    fingerprint: str
    transform: Any = None
    preprocessing: str = "none"

    def describe(self) -> dict[str, Any]:
        """Plain data stored in checkpoints: enough to rebuild this encoder with :func:`load_encoder`."""
        norm = self.norm if isinstance(self.norm, str) else [list(v) for v in mean_std(self.norm)]
        return {"model": self.source, "img_size": self.img_size, "norm": norm, "pool": self.pool,
                "kind": self.kind, "seed": self.seed, "dim": self.dim, "preprocessing": self.preprocessing}

    def image_transform(self) -> Any:
        """PIL image -> input tensor: :attr:`transform`, or the plain resize and normalisation."""
        return self.transform if self.transform is not None else eval_transform(self.img_size, self.norm)


def _probe_dim(model: nn.Module, img_size: int, pool: str, name: str) -> int:
    """The embedding size, from one blank image; a model that cannot take ``img_size`` is a one-line error."""
    try:
        with torch.no_grad():
            out = pool_features(model.eval(), torch.zeros(1, 3, img_size, img_size), pool)
    except LeukolabError:
        raise
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise LeukolabError(f"encoder {name} cannot embed {img_size}-px cells ({first}); "
                            "pass another --img-size") from None
    return int(out.shape[-1])


def _norm(value: Any) -> Normalisation | None:
    if value is None or isinstance(value, str):
        return value
    mean, std = value
    return (tuple(float(v) for v in mean), tuple(float(v) for v in std))


def load_encoder(
    source: str | Path | None,
    img_size: int | None = None,
    norm: Any = None,
    pool: str = "cls",
    seed: int = 0,
    allow_pickle: bool = False,
) -> Encoder:
    """The encoder ``source`` names (see the module docstring), in eval mode.

    Raises:
        LeukolabError: no encoder, a path that cannot be read, an unknown timm
            name, or an input size the encoder cannot take.
    """
    if source is None or str(source).strip() == "":
        raise LeukolabError("no --encoder given; expected a leukolab run or checkpoint, a converted backbone, "
                            "or a timm model name")
    path = Path(source)
    norm = _norm(norm)
    if names_morphology(source):
        size = int(img_size or MORPHOLOGY_SIZE)
        model = MorphologyEncoder().eval()
        return Encoder(model, size, _RAW, pool, MORPHOLOGY, MORPHOLOGY, int(seed), model.num_features, None,
                       f"{MORPHOLOGY}:v1", None, "none")
    if path.exists():
        loaded = load_any_backbone(path, img_size, norm=norm if isinstance(norm, str) else None,
                                   allow_pickle=allow_pickle, run_preprocessing=True)
        model, size, kind = loaded.model, loaded.img_size, loaded.kind
        use_norm: Normalisation = norm if norm is not None else loaded.normalisation
        ckpt = resolve_checkpoint_path(path)
        stat = ckpt.stat()
        fingerprint = f"{ckpt.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        transform, preprocessing = None, "none"
        if loaded.run_input is not None and loaded.run_input.description != "none":
            transform = v2.Compose([loaded.run_input, *eval_transform(size, use_norm).transforms])
            preprocessing = loaded.run_input.description
            fingerprint += f":{preprocessing}"
        spec = None
        if kind not in ("converted", "raw"):
            spec = checkpoint_backbone_spec(ckpt, allow_pickle=allow_pickle)
        name, source_text = loaded.name, str(path.resolve())
    else:
        if any(sep in str(source) for sep in ("/", "\\")) or str(source).endswith((".pt", ".pth", ".safetensors")):
            raise LeukolabError(f"encoder {source} does not exist; expected a run folder, a checkpoint file or a "
                                "timm model name")
        name = resolve_backbone_name(str(source))
        size = int(img_size or DEFAULT_TIMM_SIZE)
        model = create_backbone(name, size)
        with torch.random.fork_rng(devices=[]):
            reinitialise(model, seed)
        kind, use_norm = "timm", norm if norm is not None else "leukolab"
        patch = model.patch_embed.patch_size[0] if is_vit(model) else None
        mean, std = mean_std(use_norm)
        spec = BackboneSpec(name, {}, size, patch, tuple(mean), tuple(std))
        fingerprint, source_text = f"timm:{name}:seed{seed}", name
        transform, preprocessing = None, "none"
    model.eval()
    dim = _probe_dim(model, size, pool, name)
    return Encoder(model, size, use_norm, pool, source_text, kind, int(seed), dim, spec, fingerprint, transform,
                   preprocessing)


def _cache_key(cohort: Cohort, encoder: Encoder) -> str:
    h = hashlib.sha1()
    norm = encoder.norm if isinstance(encoder.norm, str) else mean_std(encoder.norm)
    h.update(json.dumps([encoder.fingerprint, encoder.img_size, str(norm), encoder.pool]).encode())
    for p in cohort.patients:
        for c in p.cells:
            st = c.stat()
            h.update(f"{os.path.abspath(c)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def embed_cohort(
    cohort: Cohort,
    encoder: Encoder,
    cache: Path | str | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[torch.Tensor]:
    """``(n_i, D)`` float32 embeddings of every patient's cells, read from / written to ``cache`` when given."""
    file = Path(cache) / f"cells-{_cache_key(cohort, encoder)}.pt" if cache is not None else None
    if file is not None and file.is_file():
        stored = load_checkpoint(file)
        if stored.get("patients") == cohort.ids:
            return list(stored["features"])
    paths = [c for p in cohort.patients for c in p.cells]
    try:
        flat = embed_paths(encoder.model, paths, encoder.img_size, encoder.norm, pool=encoder.pool,
                           batch_size=batch_size, device=device, show_progress=progress,
                           transform=encoder.image_transform())
    except (RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise LeukolabError(f"encoder {encoder.source} cannot embed the cells ({first})") from None
    feats = list(torch.from_numpy(flat).split([len(p.cells) for p in cohort.patients]))
    if file is not None:
        save_checkpoint({"patients": cohort.ids, "encoder": encoder.describe(), "features": [f.clone() for f in feats]},
                        file)
    return feats
