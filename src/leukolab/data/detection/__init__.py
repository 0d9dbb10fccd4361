"""Box-annotated smear fields: readers and writers of VOC / COCO / YOLO, datasets, transforms, collate."""

from __future__ import annotations

from leukolab.data.detection.dataset import DetectionDataset, detection_collate, pad_images
from leukolab.data.detection.formats import (
    FORMATS,
    Annotation,
    DetectionData,
    Repairs,
    detect_format,
    is_detection_layout,
    normalise_class,
    read_coco,
    read_detection,
    read_voc,
    read_yolo,
)

__all__ = [
    "FORMATS",
    "Annotation",
    "DetectionData",
    "DetectionDataset",
    "Repairs",
    "detect_format",
    "detection_collate",
    "is_detection_layout",
    "normalise_class",
    "pad_images",
    "read_coco",
    "read_detection",
    "read_voc",
    "read_yolo",
]
