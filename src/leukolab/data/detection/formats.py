"""Read and write box annotations in the three common layouts: Pascal VOC, COCO and YOLO.

Every reader gives a :class:`DetectionData`: one :class:`Annotation` per image
(boxes as ``x1, y1, x2, y2`` pixel edges, so a box covering pixel columns 0..9
has ``x1 = 0, x2 = 10``), the class list, the splits the data names, and the
:class:`Repairs` made on the way. Class names are normalised (lower case, single
spaces): BCCD's ``WBC``, ``RBC``, ``Platelets`` become ``wbc``, ``rbc``, ``platelets``.

Layouts (found by :func:`detect_format`; images live in ``images/`` or ``JPEGImages/``):

* **VOC** - ``Annotations/*.xml`` (the BCCD layout); coordinates are 1-based
  inclusive pixel indices, read as ``x1 = xmin - 1, x2 = xmax`` (detectron2's
  convention); splits from ``ImageSets/Main/{train,val,test,trainval}.txt``.
* **COCO** - one JSON (``annotations.json``, any ``*.json`` at the top or in
  ``annotations/``); ``file_name`` is relative to the image folder. Several JSON
  files named after splits (``instances_train.json`` ...) give those splits.
* **YOLO** - ``labels/*.txt`` (``class cx cy w h``, normalised) next to
  ``images/`` with the class list in ``data.yaml`` (``names``) or
  ``classes.txt``; ``images/<split>/`` + ``labels/<split>/`` give splits.

Defects that can be repaired are repaired and counted (boxes clipped to the
image, boxes under 2 px dropped, duplicated boxes dropped, images without an
annotation file skipped or, in YOLO, taken as background); the rest is a
one-line :class:`LeukolabError` naming the file.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from leukolab.errors import LeukolabError

FORMATS = ("voc", "coco", "yolo")
IMAGE_DIRS = ("images", "JPEGImages")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test", "trainval")
MIN_BOX_SIDE = 2.0
"""Boxes narrower or lower than this many pixels (after clipping) are dropped."""
DUPLICATE_IOU = 0.95
"""Two boxes of one class that overlap at least this much in one image are one box annotated twice."""


def normalise_class(name: str) -> str:
    """The canonical spelling of a class name: lower case, single spaces (``'Platelets '`` -> ``'platelets'``)."""
    return " ".join(str(name).split()).lower()


@dataclass
class Annotation:
    """The boxes of one image."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float64: x1, y1, x2, y2 in pixels
    labels: list[str]  # normalised class name of each box

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if len(self.labels) != len(self.boxes):
            raise ValueError("boxes and labels differ in length")


@dataclass
class Repairs:
    """Annotation defects that were repaired, with the first file showing each."""

    clipped: int = 0
    tiny: int = 0
    duplicates: int = 0
    unannotated: int = 0
    unannotated_as_background: bool = False
    examples: dict[str, str] = field(default_factory=dict)

    def note(self, kind: str, source: str, n: int = 1) -> None:
        """Count ``n`` defects of ``kind`` seen in ``source``."""
        if n:
            setattr(self, kind, getattr(self, kind) + n)
            self.examples.setdefault(kind, source)

    def summary(self) -> str | None:
        """One line naming every repair (None when nothing was repaired)."""
        parts = []
        for kind, text in (
            ("clipped", "box(es) clipped to the image"),
            ("tiny", f"box(es) under {MIN_BOX_SIDE:g} px dropped"),
            ("duplicates", "duplicated box(es) dropped"),
            (
                "unannotated",
                "image(s) without an annotation file "
                + ("taken as background" if self.unannotated_as_background else "skipped"),
            ),
        ):
            n = getattr(self, kind)
            if n:
                parts.append(f"{n} {text} (e.g. {self.examples[kind]})")
        return "repaired annotations: " + "; ".join(parts) if parts else None


@dataclass
class DetectionData:
    """A box-annotated image collection."""

    root: Path
    format: str
    classes: list[str]
    items: list[Annotation]
    splits: dict[str, list[int]] = field(default_factory=dict)  # split name -> indices into items
    repairs: Repairs = field(default_factory=Repairs)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> DetectionData:
        """The images at ``indices`` (classes kept, no splits)."""
        return DetectionData(self.root, self.format, list(self.classes), [self.items[i] for i in indices])

    def label_indices(self, item: Annotation) -> np.ndarray:
        """Class index (in :attr:`classes`) of every box of ``item``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for c in item.labels], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------


def _image_dir(root: Path) -> Path | None:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    return None


def _coco_jsons(root: Path) -> list[Path]:
    found = sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
    return [p for p in found if not p.name.startswith(".")]


def detect_format(root: Path | str) -> str:
    """``'voc'``, ``'coco'`` or ``'yolo'`` from the folder layout (checked in that order), else an error."""
    root = Path(root)
    if not root.is_dir():
        raise LeukolabError(f"{root} is not a folder; expected a detection data set (VOC, COCO or YOLO layout)")
    has_images = _image_dir(root) is not None
    if (root / "Annotations").is_dir() and any((root / "Annotations").glob("*.xml")) and has_images:
        return "voc"
    if has_images and _coco_jsons(root):
        return "coco"
    if (root / "labels").is_dir() and (root / "images").is_dir():
        return "yolo"
    raise LeukolabError(
        f"{root} is not a detection data set; expected JPEGImages/ + Annotations/*.xml (VOC), "
        "images/ + a COCO .json, or images/ + labels/ + data.yaml or classes.txt (YOLO)"
    )


def is_detection_layout(root: Path | str) -> bool:
    """True when :func:`detect_format` recognises ``root``."""
    try:
        detect_format(root)
    except LeukolabError:
        return False
    return True


def read_detection(root: Path | str, format: str = "auto") -> DetectionData:
    """Read a detection data set; ``format`` is ``'auto'`` (from the layout), ``'voc'``, ``'coco'`` or ``'yolo'``."""
    root = Path(root)
    fmt = detect_format(root) if format == "auto" else format
    readers = {"voc": read_voc, "coco": read_coco, "yolo": read_yolo}
    if fmt not in readers:
        raise LeukolabError(f"unknown detection format {format!r}; expected auto, {', '.join(FORMATS)}")
    if not root.is_dir():
        raise LeukolabError(f"{root} is not a folder; expected a {fmt.upper()} data set")
    data = readers[fmt](root)
    if not data.items:
        raise LeukolabError(f"{root}: no annotated images found; expected a {fmt.upper()} data set")
    if not any(len(a.boxes) for a in data.items):
        raise LeukolabError(f"{root}: no valid box left after dropping invalid boxes; expected annotated cells")
    return data


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header, or a one-line error naming the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        kind = exc.__class__.__name__
        raise LeukolabError(f"cannot read image {path} ({kind}); expected a JPEG or PNG image") from None


def _find_image(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    if path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:  # annotation tools often record another extension
        for candidate in (path.with_suffix(suffix), path.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    raise LeukolabError(f"{source} names image {name!r}, which does not exist in {folder}")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def clean_boxes(
    boxes: np.ndarray, labels: list[str], width: int, height: int, source: str, repairs: Repairs
) -> tuple[np.ndarray, list[str]]:
    """Clip boxes to the image, drop boxes under :data:`MIN_BOX_SIDE` px and duplicates; count what changed."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise LeukolabError(f"{source}: a box has a non-numeric coordinate; expected finite numbers")
    lo, hi = np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])
    boxes = np.concatenate([lo, hi], axis=1)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep_side = ((clipped[:, 2:] - clipped[:, :2]) >= MIN_BOX_SIDE).all(axis=1)
    changed = (np.abs(clipped - boxes) > 0.01).any(axis=1)  # (rounding in normalised YOLO files is no defect)
    repairs.note("clipped", source, int((changed & keep_side).sum()))
    repairs.note("tiny", source, int((~keep_side).sum()))
    kept_boxes: list[np.ndarray] = []
    kept_labels: list[str] = []
    kept = [lab for lab, k in zip(labels, keep_side, strict=True) if k]
    for box, label in zip(clipped[keep_side], kept, strict=True):
        same = [i for i, lab in enumerate(kept_labels) if lab == label]
        if same and _iou_one_to_many(box, np.stack([kept_boxes[i] for i in same])).max() >= DUPLICATE_IOU:
            repairs.note("duplicates", source)
            continue
        kept_boxes.append(box)
        kept_labels.append(label)
    return np.array(kept_boxes, dtype=np.float64).reshape(-1, 4), kept_labels


def _split_indices(stems_by_split: dict[str, set[str]], items: list[Annotation]) -> dict[str, list[int]]:
    out = {}
    for name, stems in stems_by_split.items():
        idx = [i for i, a in enumerate(items) if a.image.stem in stems]
        if idx:
            out[name] = idx
    return out


# ----------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------


def _xml_number(node: ET.Element, tag: str, source: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LeukolabError(f"{source}: <{tag}> is {text!r}; expected a number") from None


def read_voc(root: Path | str) -> DetectionData:
    """Read ``Annotations/*.xml`` with images in ``JPEGImages/`` (or ``images/``)."""
    root = Path(root)
    image_dir = _image_dir(root)
    ann_dir = root / "Annotations"
    if image_dir is None or not ann_dir.is_dir():
        raise LeukolabError(f"{root}: expected JPEGImages/ (or images/) and Annotations/ for a VOC data set")
    repairs = Repairs()
    items: list[Annotation] = []
    used: set[Path] = set()
    for xml_path in sorted(ann_dir.glob("*.xml")):
        source = f"{ann_dir.name}/{xml_path.name}"
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            raise LeukolabError(f"cannot parse {xml_path} ({exc}); expected Pascal VOC XML") from None
        name = tree.findtext("filename") or f"{xml_path.stem}.jpg"
        image = _find_image(image_dir, Path(name.strip()).name, source)
        width, height = image_size(image)
        boxes, labels = [], []
        for obj in tree.iter("object"):
            label = normalise_class(obj.findtext("name") or "")
            bnd = obj.find("bndbox")
            if not label or bnd is None:
                raise LeukolabError(f"{source}: an <object> lacks a <name> or <bndbox>; expected both")
            xmin, ymin, xmax, ymax = (_xml_number(bnd, t, source) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
            labels.append(label)
        clean, clean_labels = clean_boxes(np.array(boxes), labels, width, height, source, repairs)
        items.append(Annotation(image, width, height, clean, clean_labels))
        used.add(image.resolve())
    for image in _list_images(image_dir):
        if image.resolve() not in used:
            repairs.note("unannotated", f"{image_dir.name}/{image.name}")
    splits: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        split_file = root / "ImageSets" / "Main" / f"{name}.txt"
        if split_file.is_file():
            splits[name] = {line.split()[0] for line in split_file.read_text().splitlines() if line.strip()}
    classes = sorted({label for a in items for label in a.labels})
    return DetectionData(root, "voc", classes, items, _split_indices(splits, items), repairs)


def voc_xml(item: Annotation, folder: str = "images") -> str:
    """Pascal VOC XML of one image (1-based inclusive integer coordinates, as :func:`read_voc` reads them)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = item.image.name
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", item.width), ("height", item.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for box, label in zip(item.boxes, item.labels, strict=True):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = label
        ET.SubElement(obj, "pose").text = "Unspecified"
        truncated = box[0] <= 0 or box[1] <= 0 or box[2] >= item.width or box[3] >= item.height
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        values = (box[0] + 1, box[1] + 1, box[2], box[3])
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), values, strict=True):
            ET.SubElement(bnd, tag).text = f"{value:g}" if value != round(value) else str(round(value))
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="unicode") + "\n"


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------


def _split_of(path: Path) -> str | None:
    stem = path.stem.lower()
    for name in ("trainval", "train", "val", "test"):
        if stem == name or stem.endswith(f"_{name}") or stem.startswith(f"{name}_"):
            return name
    return None


def read_coco(root: Path | str) -> DetectionData:
    """Read ``images/`` and a COCO JSON (several JSON files named after splits give those splits)."""
    root = Path(root)
    image_dir = _image_dir(root)
    jsons = _coco_jsons(root)
    if image_dir is None or not jsons:
        raise LeukolabError(f"{root}: expected images/ and a COCO .json for a COCO data set")
    if len(jsons) > 1 and any(_split_of(p) is None for p in jsons):
        names = ", ".join(p.name for p in jsons)
        raise LeukolabError(
            f"{root}: several JSON files ({names}); expected one, or one per split named *_train.json ..."
        )
    repairs = Repairs()
    items: list[Annotation] = []
    splits: dict[str, list[int]] = {}
    categories: dict[str, int] = {}  # name -> smallest id seen
    for json_path in jsons:
        source = json_path.relative_to(root).as_posix()
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
            cats = {int(c["id"]): normalise_class(c["name"]) for c in doc["categories"]}
            images = doc["images"]
            anns = doc.get("annotations", [])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"{exc.__class__.__name__}: {exc}"
            raise LeukolabError(f"cannot read {json_path} ({why}); expected COCO JSON") from None
        for cid, name in cats.items():
            categories[name] = min(cid, categories.get(name, cid))
        by_image: dict[int, list[dict]] = {}
        for a in anns:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        split = _split_of(json_path) if len(jsons) > 1 else None
        for im in images:
            file_name = str(im["file_name"])
            path = image_dir / file_name
            if not path.is_file() and (root / file_name).is_file():
                path = root / file_name
            if not path.is_file():
                raise LeukolabError(f"{source} names image {file_name!r}, which does not exist in {image_dir}")
            width, height = image_size(path)
            boxes, labels = [], []
            for a in by_image.get(int(im["id"]), []):
                if int(a.get("iscrowd", 0)):
                    continue
                if int(a["category_id"]) not in cats:
                    raise LeukolabError(
                        f"{source}: annotation {a.get('id')} has unknown category_id {a['category_id']}"
                    )
                x, y, w, h = (float(v) for v in a["bbox"])
                boxes.append((x, y, x + w, y + h))
                labels.append(cats[int(a["category_id"])])
            clean, clean_labels = clean_boxes(np.array(boxes), labels, width, height, f"{source}:{file_name}", repairs)
            if split:
                splits.setdefault(split, []).append(len(items))
            items.append(Annotation(path, width, height, clean, clean_labels))
    classes = sorted(categories, key=lambda c: (categories[c], c))
    return DetectionData(root, "coco", classes, items, splits, repairs)


def coco_json(items: Sequence[Annotation], classes: Sequence[str], image_root: Path) -> dict:
    """A COCO ground-truth document (category ids 1..K in ``classes`` order; file names relative to ``image_root``)."""
    cat_id = {c: i + 1 for i, c in enumerate(classes)}
    images, anns = [], []
    for i, item in enumerate(items):
        images.append({"id": i + 1, "file_name": item.image.relative_to(image_root).as_posix(),
                       "width": item.width, "height": item.height})
        for box, label in zip(item.boxes, item.labels, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[label],
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": cat_id[c], "name": c, "supercategory": "cell"} for c in classes]
    return {"images": images, "annotations": anns, "categories": categories}


# ----------------------------------------------------------------------------------------------
# YOLO
# ----------------------------------------------------------------------------------------------


def _yolo_classes(root: Path) -> list[str]:
    yaml_path = next((p for p in (root / "data.yaml", root / "dataset.yaml") if p.is_file()), None)
    if yaml_path is not None:
        import yaml

        try:
            doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise LeukolabError(f"cannot parse {yaml_path} ({exc.__class__.__name__}); expected YAML") from None
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        if not isinstance(names, list) or not names:
            raise LeukolabError(f"{yaml_path}: expected a 'names' list (or index: name mapping) of classes")
        return [normalise_class(n) for n in names]
    if (root / "classes.txt").is_file():
        names = [line.strip() for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines()]
        return [normalise_class(n) for n in names if n]
    raise LeukolabError(f"{root}: no data.yaml or classes.txt; expected the class list of the YOLO labels")


def read_yolo(root: Path | str) -> DetectionData:
    """Read ``images/`` + ``labels/`` (flat, or one subfolder per split) with the class list of ``data.yaml``."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise LeukolabError(f"{root}: expected images/ and labels/ for a YOLO data set")
    classes = _yolo_classes(root)
    if len(set(classes)) != len(classes):
        raise LeukolabError(f"{root}: the class list has duplicates ({', '.join(classes)})")
    subdirs = [s for s in SPLIT_NAMES if (root / "images" / s).is_dir()]
    folders: list[tuple[str | None, Path, Path]] = [(s, root / "images" / s, root / "labels" / s) for s in subdirs]
    folders = folders or [(None, root / "images", root / "labels")]
    repairs = Repairs(unannotated_as_background=True)
    items: list[Annotation] = []
    splits: dict[str, list[int]] = {}
    for split, image_dir, label_dir in folders:
        for image in _list_images(image_dir):
            width, height = image_size(image)
            label_path = label_dir / f"{image.stem}.txt"
            source = label_path.relative_to(root).as_posix()
            boxes, labels = [], []
            if label_path.is_file():
                for line_no, line in enumerate(label_path.read_text(encoding="utf-8").splitlines(), 1):
                    fields = line.split()
                    if not fields:
                        continue
                    try:
                        cid = int(fields[0])
                        cx, cy, w, h = (float(v) for v in fields[1:5])
                        if len(fields) < 5:
                            raise ValueError
                    except ValueError:
                        raise LeukolabError(
                            f"{source} line {line_no}: {line.strip()!r}; expected 'class cx cy w h'"
                        ) from None
                    if not 0 <= cid < len(classes):
                        raise LeukolabError(
                            f"{source} line {line_no}: class {cid} is not in the class list "
                            f"(0-{len(classes) - 1}: {', '.join(classes)})"
                        )
                    x1, y1 = (cx - w / 2) * width, (cy - h / 2) * height
                    boxes.append((x1, y1, x1 + w * width, y1 + h * height))
                    labels.append(classes[cid])
            else:
                repairs.note("unannotated", image.relative_to(root).as_posix())
            clean, clean_labels = clean_boxes(np.array(boxes), labels, width, height, source, repairs)
            if split:
                splits.setdefault(split, []).append(len(items))
            items.append(Annotation(image, width, height, clean, clean_labels))
    return DetectionData(root, "yolo", classes, items, splits, repairs)


def yolo_lines(item: Annotation, classes: Sequence[str]) -> str:
    """YOLO label text of one image (``class cx cy w h``, normalised, 6 decimals)."""
    index = {c: i for i, c in enumerate(classes)}
    lines = []
    for (x1, y1, x2, y2), label in zip(item.boxes, item.labels, strict=True):
        cx, cy = (x1 + x2) / 2 / item.width, (y1 + y2) / 2 / item.height
        w, h = (x2 - x1) / item.width, (y2 - y1) / item.height
        lines.append(f"{index[label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def yolo_yaml(classes: Iterable[str]) -> str:
    """A minimal ``data.yaml`` naming the classes."""
    import yaml

    names = list(classes)
    doc = {"path": ".", "train": "images", "val": "images", "nc": len(names), "names": names}
    return yaml.safe_dump(doc, sort_keys=False)
