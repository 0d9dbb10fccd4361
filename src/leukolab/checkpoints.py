"""Reading and writing checkpoints: one module, one trust policy.

* leukolab's own files (``best.pt``, ``last.pt``, ``checkpoints/epoch_*.pt``,
  converted backbones) hold plain data only — tensors, numbers, strings,
  ``None`` and lists/tuples/dicts of them — so they load with
  ``torch.load(weights_only=True)``. :func:`save_checkpoint` refuses anything
  else before it writes.
* Foreign files that hold pickled Python objects (which can run code when
  loaded) are read only with an explicit ``allow_pickle=True``
  (``--allow-pickle`` on the command line); otherwise
  :func:`load_checkpoint` stops with a one-line error.
* A backbone is described by :class:`BackboneSpec` (timm name, kwargs, image
  and patch size, normalisation: the shape of timm's ``pretrained_cfg``),
  stored as ``backbone_spec`` next to the ``backbone`` weights.
"""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from leukolab.errors import LeukolabError
from leukolab.utils.files import atomic_write

#: the format tag of checkpoints written by this version
CHECKPOINT_FORMAT = "leukolab-checkpoint-v2"

#: prefixes that wrappers (DDP, objectives, SSL frameworks) put in front of backbone keys, stripped in this order
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "teacher.", "student.", "model.", "encoder.")

#: entries that hold a state dict inside a checkpoint, most preferred first: leukolab's ``backbone``, then the
#: DINO teacher (the EMA model that is evaluated, preferred over the student) and the usual trainer containers
CONTAINER_KEYS = ("backbone", "teacher", "state_dict", "model", "model_ema", "module", "encoder", "student")

#: leukolab's own normalisation (the synthetic and most WBC sets) and ImageNet's (released weights)
LEUKOLAB_MEAN = (0.5, 0.5, 0.5)
LEUKOLAB_STD = (0.25, 0.25, 0.25)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


@dataclass
class BackboneSpec:
    """What it takes to rebuild a backbone and feed it images (timm ``pretrained_cfg``-like).

    Attributes:
        name: timm model name (``vit_small_patch14_reg4_dinov2``, ``resnet18``).
        kwargs: extra ``timm.create_model`` keyword arguments (``reg_tokens``, ``patch_size`` ...).
        img_size: the input size the weights were trained or converted at (None: any).
        patch_size: ViT patch size (None for CNNs).
        mean: per-channel input mean.
        std: per-channel input standard deviation.
        crop_pct: evaluation preprocessing, timm's ``crop_pct``: 1.0 resizes the whole image to
            ``img_size`` (leukolab's ``eval_transform``); below 1 the short side is resized to
            ``img_size / crop_pct`` and the centre ``img_size`` square kept (DINOv2 and ImageNet
            models: 0.875, i.e. resize 256 and crop 224).
        interpolation: the resize interpolation of that preprocessing (``bilinear`` or ``bicubic``).
        interpolate_antialias: how the position grid is resampled for another image size
            (:func:`leukolab.models.pos_embed.resample_grid`): antialias when shrinking.
        interpolate_offset: 0 resamples to the exact grid (timm); DINOv2 releases without
            registers use a scale factor ``(new + 0.1) / old`` (its ``interpolate_offset``).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    patch_size: int | None = None
    mean: tuple[float, ...] = LEUKOLAB_MEAN
    std: tuple[float, ...] = LEUKOLAB_STD
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict` (unknown keys ignored)."""
        return cls(
            name=str(d["name"]), kwargs=dict(d.get("kwargs") or {}),
            img_size=int(d["img_size"]) if d.get("img_size") else None,
            patch_size=int(d["patch_size"]) if d.get("patch_size") else None,
            mean=tuple(float(v) for v in d.get("mean") or LEUKOLAB_MEAN),
            std=tuple(float(v) for v in d.get("std") or LEUKOLAB_STD),
            crop_pct=float(d.get("crop_pct") or 1.0),
            interpolation=str(d.get("interpolation") or "bilinear"),
            interpolate_antialias=bool(d.get("interpolate_antialias", True)),
            interpolate_offset=float(d.get("interpolate_offset") or 0.0),
        )


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoints take str/int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only tensors, "
        "numbers, strings, None and lists/dicts of them (so they load with weights_only=True)"
    )


def save_checkpoint(obj: Mapping[str, Any], path: Path | str, *, overwrite: bool = True) -> Path:
    """Atomically ``torch.save`` a plain-data checkpoint (refused with ``TypeError`` otherwise)."""
    check_plain(obj)
    return atomic_write(path, lambda tmp: _torch_save(dict(obj), tmp), overwrite=overwrite)


def _torch_save(obj: dict[str, Any], tmp: Path) -> None:
    """``torch.save``, with a failed write (a full disk, a quota) turned into an ``OSError`` that says so."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as exc:  # torch's zip writer reports a failed write as RuntimeError
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        free = shutil.disk_usage(tmp.parent).free / 2**20
        raise OSError(f"torch.save failed: {reason}; {free:.0f} MiB free on that disk") from None


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A run folder resolves to its ``best.pt`` (else ``last.pt``); a file to itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise LeukolabError(f"{path}: no best.pt or last.pt in this folder; expected a leukolab run folder")
    if not path.is_file():
        raise LeukolabError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: Path | str, *, allow_pickle: bool = False) -> Any:
    """Load a checkpoint file (or run folder) on the CPU.

    ``.safetensors`` files are read with :mod:`safetensors`; everything else with
    ``torch.load(weights_only=True)``. A file that holds pickled Python objects
    is refused unless ``allow_pickle`` (loading it would run code from the file).

    Raises:
        LeukolabError: missing, unreadable, corrupt, or pickled without ``allow_pickle``.
    """
    path = resolve_checkpoint_path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LeukolabError(f"{path}: reading .safetensors needs the safetensors package") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise LeukolabError(f"cannot read {path} as safetensors ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc) and "GLOBAL" not in str(exc):  # not a refused class but a broken file
            raise LeukolabError(f"cannot read checkpoint {path}: not a torch.save file, or corrupt") from None
        if not allow_pickle:
            raise LeukolabError(
                f"{path} holds pickled Python objects, which can run code when loaded; "
                "pass --allow-pickle only if you trust the file"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, io.UnsupportedOperation) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise LeukolabError(f"cannot read checkpoint {path} ({exc.__class__.__name__}: {first})") from None
    except Exception:  # the weights-only unpickler fails on other bytes (text, ONNX ...) with e.g. KeyError
        raise LeukolabError(f"cannot read checkpoint {path}: not a torch.save file, or corrupt") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the explicit --allow-pickle opt-in
    except Exception as exc:  # arbitrary unpickling failures
        raise LeukolabError(f"cannot read checkpoint {path} ({exc.__class__.__name__})") from None


def load_run_state(run: Path | str, task: str, command: str) -> dict[str, Any]:
    """The ``best.pt`` of a finished run folder (or a checkpoint file) written by ``leukolab <command>``.

    Loaded with :func:`load_checkpoint` (``weights_only=True``); a checkpoint of another ``task`` is refused.
    """
    run = Path(run)
    path = run / "best.pt" if run.is_dir() else run
    if not path.is_file():
        raise LeukolabError(f"{run}: no best.pt; expected a finished leukolab {command} run folder")
    state = load_checkpoint(path)
    found = state.get("task") if isinstance(state, dict) else None
    if found != task:
        raise LeukolabError(f"{path} is not a {task} run (task={found!r}); expected a folder written by "
                            f"leukolab {command}")
    return state


def strip_wrappers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """``sd`` with the :data:`WRAPPER_PREFIXES` every key shares removed (repeatedly)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def tensors_of(obj: Any) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict inside a loaded checkpoint ({} when there is none).

    Descends through :data:`CONTAINER_KEYS` until a dict holds tensors itself
    (``{"teacher": {...}}``, ``{"model": {...}}``, leukolab's ``{"backbone": {...}}``);
    entries that are not tensors (epoch counters, configs) are left out. A
    pickled ``nn.Module`` (only read with ``allow_pickle``) gives its state dict.
    Wrapper prefixes stay; see :func:`strip_wrappers`.
    """
    for _ in range(8):
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            return {}
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = [obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), torch.nn.Module) or (
            isinstance(obj.get(k), Mapping) and obj[k])]
        if not inner:
            return {}
        obj = inner[0]
    return {}
