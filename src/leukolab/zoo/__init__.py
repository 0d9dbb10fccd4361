"""Model zoo: offline conversion of published ViT checkpoints into timm layout."""

from leukolab.zoo.convert import (
    FORMATS,
    ConversionReport,
    build_vit_from_checkpoint,
    convert_checkpoint,
    convert_state_dict,
    detect_format,
    infer_vit_config,
    load_converted_backbone,
    load_state_dict_file,
    vit_from_config,
)

__all__ = [
    "FORMATS",
    "ConversionReport",
    "build_vit_from_checkpoint",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_format",
    "infer_vit_config",
    "load_converted_backbone",
    "load_state_dict_file",
    "vit_from_config",
]
