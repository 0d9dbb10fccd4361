"""Model zoo: offline conversion of published ViT checkpoints into timm layout.

* :mod:`~leukolab.zoo.layouts`: reading a file, looking through wrappers, naming its layout;
* :mod:`~leukolab.zoo.dinov2`, :mod:`~leukolab.zoo.hf`: a layout's names onto timm's;
* :mod:`~leukolab.zoo.fit`: those tensors fitted onto a timm ``VisionTransformer``;
* :mod:`~leukolab.zoo.releases`: the table of known releases (DINOv2, DinoBloom);
* :mod:`~leukolab.zoo.convert`: the entry point (infer, build, convert, reload).
"""

from leukolab.zoo.convert import (
    build_vit_from_checkpoint,
    convert_checkpoint,
    convert_state_dict,
    infer_vit_config,
    load_converted_backbone,
    spec_from_vit_config,
    vit_from_config,
)
from leukolab.zoo.fit import ConversionReport
from leukolab.zoo.layouts import FORMATS, detect_format, load_state_dict_file
from leukolab.zoo.releases import RELEASES, Release, get_release, match_release

__all__ = [
    "FORMATS",
    "RELEASES",
    "ConversionReport",
    "Release",
    "build_vit_from_checkpoint",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_format",
    "get_release",
    "infer_vit_config",
    "load_converted_backbone",
    "load_state_dict_file",
    "match_release",
    "spec_from_vit_config",
    "vit_from_config",
]
