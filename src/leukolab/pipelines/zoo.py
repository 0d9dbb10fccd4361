"""The ``convert`` recipe: an external ViT checkpoint into a leukolab/timm backbone file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leukolab.zoo import ConversionReport, convert_checkpoint

__all__ = ["ConvertOptions", "convert_backbone"]


@dataclass
class ConvertOptions:
    """How :func:`convert_backbone` reads the source checkpoint.

    Attributes:
        fmt: ``dinov2``, ``timm`` or ``hf-vitmae`` (``None``: detected from the keys).
        img_size: image size the converted model is built for.
        num_heads: head count (only needed for non-standard widths).
        strict: refuse checkpoints that do not fill the model.
        allow_pickle: read files holding pickled Python objects (runs code from the file).
        release: a :data:`leukolab.zoo.RELEASES` name (``None``: matched by architecture).
    """

    fmt: str | None = None
    img_size: int = 224
    num_heads: int | None = None
    strict: bool = True
    allow_pickle: bool = False
    release: str | None = None


def convert_backbone(src: Path | str, out: Path | str, options: ConvertOptions | None = None) -> ConversionReport:
    """Convert ``src`` into the new backbone file ``out``; the report says what was mapped, resized and dropped."""
    opts = options or ConvertOptions()
    return convert_checkpoint(Path(src), Path(out), opts.fmt, opts.img_size, num_heads=opts.num_heads,
                              strict=opts.strict, allow_pickle=opts.allow_pickle, release=opts.release)
