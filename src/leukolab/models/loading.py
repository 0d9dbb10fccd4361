"""Any backbone leukolab can read, headless and ready to embed images (``embed``, ``viz``).

:func:`load_any_backbone` turns a model argument into a :class:`LoadedBackbone`,
whatever it names:

* a checkpoint that describes its backbone -- a leukolab run folder or
  checkpoint, or a backbone written by ``leukolab convert``: its
  :class:`~leukolab.checkpoints.BackboneSpec` (the ``backbone_spec`` entry,
  or what :func:`leukolab.models.weights.backbone_spec_of` reads from older
  files) builds the timm model, and the ``backbone`` weights are loaded into
  it (:func:`leukolab.models.weights.load_backbone_state`);
* a raw DINOv2 / DinoBloom / timm / HF-ViTMAE ViT file, built by
  :func:`leukolab.zoo.build_vit_from_checkpoint` at ``img_size`` (default 224).

The input normalisation travels with the weights: the spec's ``mean`` and
``std`` (leukolab's statistics for older leukolab checkpoints, ImageNet's for
converted ones), ImageNet's for raw external files; ``norm`` overrides it.
:meth:`LoadedBackbone.input_transform` is how ``embed`` and ``viz`` feed images: the
weights' own evaluation recipe (:func:`leukolab.data.transforms.model_eval_transform`:
the spec's ``crop_pct`` centre crop and interpolation when it records one, else the
whole image resized to ``img_size``), or the whole image resized (``resize``).

Asked to (``run_preprocessing``), a classifier run (``leukolab train``) is fed as ``evaluate`` / ``predict`` feed it
(:class:`~leukolab.pipelines.predictors.RunPredictor`): its recorded image
preprocessing -- cell-centred crop, stain normalisation with the reference stored in
the run folder -- rebuilt by :func:`leukolab.data.preprocess.run_preprocess`, then the
shrink to twice the run's image size, then the resize and normalisation
(:class:`RunInput`). Converted and external checkpoints are fed as before.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from leukolab.checkpoints import BackboneSpec, load_checkpoint, resolve_checkpoint_path, tensors_of
from leukolab.data.dataset import shrink
from leukolab.data.preprocess import fallback_count, option, run_preprocess
from leukolab.data.transforms import NORMALISATIONS, Normalisation, check_normalisation, mean_std, model_eval_transform
from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone, is_vit
from leukolab.models.tokens import num_prefix_tokens, num_reg_tokens
from leukolab.models.weights import backbone_spec_of, load_backbone_state

__all__ = ["DEFAULT_RAW_IMG_SIZE", "LoadedBackbone", "RunInput", "describe_normalisation", "load_any_backbone",
           "reinitialise", "run_input"]

#: image size of raw external checkpoints when none is given
DEFAULT_RAW_IMG_SIZE = 224


@dataclass
class RunInput:
    """A classifier run's image preparation before the resize, as ``evaluate`` / ``predict`` do it (PIL -> PIL).

    ``preprocess``: the run's recorded preprocessing (:func:`leukolab.data.preprocess.run_preprocess`:
    cell crop, stain normalisation; ``None`` when it records none); then the image is shrunk to
    ``max_side`` (twice the run's image size), as :class:`~leukolab.pipelines.predictors.RunPredictor` does.
    """

    preprocess: Callable[[Image.Image], Image.Image] | None
    max_side: int
    description: str = "none"

    @property
    def fallbacks(self) -> int:
        """Images in which the run's cell crop found no cell (they were used whole)."""
        return fallback_count(self.preprocess)

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        return shrink(self.preprocess(image) if self.preprocess is not None else image, self.max_side)


def run_input(obj: Mapping[str, Any], run_dir: Path) -> RunInput | None:
    """The :class:`RunInput` of a loaded classifier checkpoint (its ``config``'s ``data:`` options and the stain
    normaliser stored in ``run_dir``); ``None`` for any other checkpoint (pretraining runs, converted or raw
    weights), which keep the plain resize.

    Raises:
        LeukolabError: the run records stain normalisation but its ``stain_norm.yaml`` is missing or unreadable.
    """
    config = obj.get("config")
    if obj.get("task") != "classification" or not isinstance(config, Mapping):
        return None
    data = config.get("data")
    if not isinstance(data, Mapping) or not data.get("img_size"):
        return None
    cfg_data = dict(data)
    steps = []
    if str(option(cfg_data, "crop")).lower() == "cell":
        steps.append(f"cell crop (margin {float(option(cfg_data, 'crop_margin')):g})")
    if str(option(cfg_data, "stain_norm")).lower() != "none":
        steps.append(f"{str(option(cfg_data, 'stain_norm')).lower()} stain normalisation")
    return RunInput(run_preprocess(cfg_data, run_dir), 2 * int(cfg_data["img_size"]), ", ".join(steps) or "none")


@dataclass
class LoadedBackbone:
    """A headless backbone in eval mode and how to feed it.

    Attributes:
        model: the backbone (``model(x)`` gives pooled features).
        img_size: the input size it was built for.
        kind: the checkpoint's ``task`` (e.g. ``classification``, ``pretrain-mae``);
            ``pretrain`` or ``run`` for leukolab checkpoints that name none;
            ``converted`` or ``raw`` for external weights.
        checkpoint: the file the weights came from.
        name: the backbone's name for messages.
        normalisation: a :data:`~leukolab.data.transforms.NORMALISATIONS` name or ``(mean, std)``.
        notes: things the user should know (resampled position embeddings ...).
        spec: the checkpoint's :class:`~leukolab.checkpoints.BackboneSpec` (``None`` for raw files).
        run_input: a classifier run's image preparation as evaluate does it (:class:`RunInput`);
            ``None`` for other checkpoints.
    """

    model: nn.Module
    img_size: int
    kind: str
    checkpoint: Path
    name: str
    normalisation: Normalisation
    notes: list[str] = field(default_factory=list)
    spec: BackboneSpec | None = None
    run_input: RunInput | None = None

    @property
    def vit(self) -> bool:
        """True for a timm Vision Transformer."""
        return is_vit(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        """Class plus register tokens (0 for non-ViTs)."""
        return num_prefix_tokens(self.model)

    @property
    def num_reg_tokens(self) -> int:
        """Register tokens (0 for non-ViTs)."""
        return num_reg_tokens(self.model)

    @property
    def norm_name(self) -> str:
        """The normalisation for messages: its name, or its mean and std."""
        return describe_normalisation(self.normalisation)

    @property
    def fallbacks(self) -> int:
        """Images in which a run's cell crop found no cell so far (used whole; 0 without a cell crop)."""
        return self.run_input.fallbacks if self.run_input is not None else 0

    def input_transform(self, preprocess: str = "release") -> v2.Compose:
        """PIL image -> model input tensor: a classifier run's :class:`RunInput` (its recorded cell crop and
        stain normalisation, as ``evaluate`` applies them), then
        :func:`~leukolab.data.transforms.model_eval_transform` (``preprocess``: ``release`` or ``resize``)."""
        tf = model_eval_transform(self.img_size, self.normalisation, self.spec, preprocess)
        return tf if self.run_input is None else v2.Compose([self.run_input, *tf.transforms])


def describe_normalisation(norm: Normalisation) -> str:
    """``leukolab`` / ``imagenet``, or ``mean (..) std (..)`` for other statistics."""
    if isinstance(norm, str):
        return norm
    mean, std = mean_std(norm)
    return f"mean ({', '.join(f'{v:.3g}' for v in mean)}) std ({', '.join(f'{v:.3g}' for v in std)})"


def _named(mean: Any, std: Any) -> Normalisation:
    """The name of known statistics, else the ``(mean, std)`` pair itself."""
    pair = mean_std((mean, std))
    for name, (m, s) in NORMALISATIONS.items():
        if all(abs(a - b) < 1e-6 for a, b in zip((*m, *s), (*pair[0], *pair[1]), strict=True)):
            return name
    return pair


def _check_patch_multiple(patch: Any, img_size: int, where: Path | str) -> None:
    ph, pw = (int(patch), int(patch)) if isinstance(patch, int) else (int(patch[0]), int(patch[-1]))
    if img_size % ph or img_size % pw:
        raise LeukolabError(f"image size {img_size} is not a multiple of {where}'s patch size {ph}")


def _kind_and_name(obj: Mapping[str, Any], spec: BackboneSpec) -> tuple[str, str]:
    if obj.get("task") == "converted" or isinstance(obj.get("backbone_config"), Mapping):
        release = obj.get("release")
        fmt = obj.get("source_format") or obj.get("format") or "?"
        return "converted", str(release) if release else f"vit (converted {fmt})"
    kind = obj.get("task") or ("pretrain" if isinstance(obj.get("backbone_name"), str) else "run")
    return str(kind), spec.name


def _load_described(
    obj: Mapping[str, Any], spec: BackboneSpec, ckpt: Path, img_size: int | None, allow_pickle: bool
) -> tuple[nn.Module, int, list[str]]:
    """Build the backbone that ``spec`` describes at ``img_size`` and load the checkpoint's weights into it."""
    native = spec.img_size
    size = int(img_size or native or 0)
    if not size:
        raise LeukolabError(f"{ckpt}: the checkpoint does not record its image size; pass --img-size")
    if spec.patch_size:
        _check_patch_multiple(spec.patch_size, size, ckpt)
    if isinstance(obj.get("adapter"), Mapping):  # an adapter run: its frozen backbone (--init file or stored) + adapter
        from leukolab.models.adapters.state import restore_adapted_backbone

        if native and size != native:
            raise LeukolabError(f"{ckpt}: an adapter run embeds at its own image size; expected --img-size {native}")
        backbone, adapter = restore_adapted_backbone(obj["adapter"], spec, obj.get("backbone"))
        return backbone, size, [f"with the run's {adapter.name} adapter"]
    if not tensors_of(obj):
        raise LeukolabError(f"{ckpt}: no 'backbone' weights in this checkpoint; expected a leukolab run")
    if "backbone_spec" not in obj and isinstance(obj.get("backbone_config"), Mapping):
        from leukolab.zoo import load_converted_backbone  # converted before backbone_spec existed

        backbone, _ = load_converted_backbone(ckpt, size, allow_pickle=allow_pickle)
    else:
        backbone = create_backbone(spec.name, size, **spec.kwargs)
        load_backbone_state(backbone, obj, ckpt)
    notes = []
    if native and size != native:
        notes.append(f"built at {size} px instead of the checkpoint's {native} px (position embedding resampled)")
    return backbone, size, notes


def load_any_backbone(
    model: Path | str,
    img_size: int | None = None,
    *,
    num_heads: int | None = None,
    norm: str | None = None,
    allow_pickle: bool = False,
    run_preprocessing: bool = False,
) -> LoadedBackbone:
    """A headless backbone in eval mode, built for ``img_size``, and how to feed it.

    Args:
        model: run folder, leukolab checkpoint, converted backbone or raw ViT file.
        img_size: input size; default the checkpoint's own (224 for raw files).
            ViTs are rebuilt for it (position embedding resampled); it must be
            a multiple of the patch size.
        num_heads: head count of a raw ViT checkpoint (only needed for
            non-standard widths).
        norm: input normalisation (``leukolab`` or ``imagenet``); default the
            checkpoint's (see the module docstring).
        allow_pickle: read files that hold pickled Python objects (runs code
            from the file; only for trusted files).
        run_preprocessing: for a classifier run, also rebuild its recorded image
            preprocessing (:attr:`LoadedBackbone.run_input`, used by
            :meth:`LoadedBackbone.input_transform`; ``embed`` and ``viz`` ask for it).

    Raises:
        LeukolabError: missing or unreadable file, unknown layout, weights
            that do not fit, an image size the ViT cannot take, or (``run_preprocessing``)
            a run whose stored stain normaliser is missing.
    """
    if img_size is not None and (isinstance(img_size, bool) or int(img_size) <= 0):
        raise LeukolabError(f"--img-size {img_size!r} must be a positive integer")
    if norm is not None:
        check_normalisation(norm)  # before anything is loaded
    path = Path(model)
    if not path.exists():
        raise LeukolabError(f"model {path} does not exist; expected a run folder or checkpoint file")
    ckpt = resolve_checkpoint_path(path)
    obj = {} if ckpt.suffix == ".safetensors" else load_checkpoint(ckpt, allow_pickle=allow_pickle)
    obj = obj if isinstance(obj, Mapping) else {}
    spec = backbone_spec_of(obj)
    if spec is not None:
        backbone, size, notes = _load_described(obj, spec, ckpt, img_size, allow_pickle)
        kind, name = _kind_and_name(obj, spec)
        normalisation = _named(spec.mean, spec.std)
    else:
        from leukolab.zoo import build_vit_from_checkpoint

        size = int(img_size or DEFAULT_RAW_IMG_SIZE)
        backbone, report = build_vit_from_checkpoint(ckpt, size, num_heads=num_heads, allow_pickle=allow_pickle)
        notes = [*report.notes, *report.resized]
        kind, name, normalisation = "raw", "vit (external checkpoint)", "imagenet"
    if is_vit(backbone):
        _check_patch_multiple(backbone.patch_embed.patch_size, size, ckpt)
    backbone.eval()
    prepare = run_input(obj, ckpt.parent) if run_preprocessing else None
    if prepare is not None and prepare.preprocess is not None:
        notes.append(f"the run's image preprocessing applied as in evaluate: {prepare.description}")
    return LoadedBackbone(backbone, size, kind, ckpt, name, norm or normalisation, notes, spec, prepare)


def reinitialise(backbone: nn.Module, seed: int = 0) -> None:
    """Replace every weight of ``backbone`` by its architecture's own random initialisation (seeded)."""
    torch.manual_seed(seed)
    if callable(getattr(backbone, "init_weights", None)):  # timm ViTs: pos-embed, tokens and blocks
        backbone.init_weights()
        return
    for module in backbone.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
