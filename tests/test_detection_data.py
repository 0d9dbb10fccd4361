"""Detection data: synthetic smear fields, the VOC / COCO / YOLO readers, repairs, errors, transforms, collate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukolab.data.detection import (
    DetectionDataset,
    detect_format,
    detection_collate,
    read_detection,
)
from leukolab.data.detection.formats import Annotation, voc_xml
from leukolab.data.detection.transforms import RandomRot90, detection_eval_transform, detection_train_transform
from leukolab.data.synthetic import WBC_CLASSES
from leukolab.data.synthetic.smears import SMEAR_CLASSES, make_smears, render_smear
from leukolab.errors import LeukolabError

BCCD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bccd" / "trainval"


@pytest.fixture(scope="module")
def smears(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_smears(tmp_path_factory.mktemp("det") / "smears", 5, width=160, height=120, seed=3, scale=0.3,
                       progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# synthetic smears
# ----------------------------------------------------------------------------------------------


def test_render_smear_boxes_are_cells_inside_the_field() -> None:
    kinds: dict[str, int] = {}
    for seed in range(6):
        img, boxes = render_smear(200, 150, np.random.default_rng(seed), 0.5, scale=0.4)
        assert img.shape == (150, 200, 3) and img.dtype == np.uint8
        for b in boxes:
            kinds[b.label] = kinds.get(b.label, 0) + 1
            assert 0 <= b.x1 < b.x2 <= 200 and 0 <= b.y1 < b.y2 <= 150
            assert (b.wbc_type in WBC_CLASSES) == (b.label == "wbc")
        covered = np.zeros(img.shape[:2], dtype=bool)
        for b in boxes:
            covered[b.y1 : b.y2, b.x1 : b.x2] = True
        if (~covered).sum() > 500:  # stained cells are darker than the plasma between them
            grey = img.astype(float).mean(axis=2)
            assert grey[covered].mean() < grey[~covered].mean() - 5
        wbcs = [b for b in boxes if b.label == "wbc"]
        rbcs = [b for b in boxes if b.label == "rbc"]
        assert len(wbcs) <= 3
        if wbcs and rbcs:  # white cells are larger than red cells
            area = [(b.x2 - b.x1) * (b.y2 - b.y1) for b in boxes]
            assert max(a for a, b in zip(area, boxes, strict=True) if b.label == "wbc") > np.median(
                [a for a, b in zip(area, boxes, strict=True) if b.label == "rbc"]
            )
    assert set(kinds) == set(SMEAR_CLASSES)
    assert kinds["rbc"] > kinds["wbc"]


def test_make_smears_layout_deterministic_and_prefix_stable(smears: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in smears.iterdir())
    assert names == ["Annotations", "annotations.json", "boxes.csv", "classes.txt", "data.yaml", "images", "labels"]
    assert len(list((smears / "images").glob("*.jpg"))) == 5
    again = make_smears(tmp_path / "again", 6, width=160, height=120, seed=3, scale=0.3, progress=False)
    a, b = _files(smears), _files(again)
    for k, v in a.items():
        if k.startswith(("images/", "Annotations/", "labels/")):
            assert b[k] == v, k
    other = make_smears(tmp_path / "other", 1, width=160, height=120, seed=4, scale=0.3, progress=False)
    assert _files(other)["images/smear_00000.jpg"] != a["images/smear_00000.jpg"]
    with pytest.raises(LeukolabError, match="not empty"):
        make_smears(smears, 1, width=64, height=64, progress=False)
    with pytest.raises(LeukolabError, match="width"):
        make_smears(tmp_path / "bad", 1, width=8, progress=False)
    assert not (tmp_path / "bad").exists()


def test_readers_round_trip_the_three_formats(smears: Path) -> None:
    data = {fmt: read_detection(smears, fmt) for fmt in ("voc", "coco", "yolo")}
    assert detect_format(smears) == "voc"
    with open(smears / "boxes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for fmt, d in data.items():
        assert d.format == fmt and len(d) == 5
        assert set(d.classes) == set(SMEAR_CLASSES)  # BCCD spellings (WBC, Platelets) normalised
        assert d.repairs.summary() is None, fmt
    for i in range(5):
        ref = data["voc"].items[i]
        mine = [r for r in rows if r["image"] == ref.image.name]
        expected = np.array([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in mine]).reshape(-1, 4)
        assert ref.labels == [r["label"].lower() for r in mine]
        np.testing.assert_allclose(ref.boxes, expected)
        for fmt in ("coco", "yolo"):
            other = data[fmt].items[i]
            assert other.image.name == ref.image.name and other.labels == ref.labels
            np.testing.assert_allclose(other.boxes, ref.boxes, atol=1e-3)
    wbc_rows = [r for r in rows if r["label"] == "WBC"]
    assert wbc_rows and all(r["wbc_type"] in WBC_CLASSES for r in wbc_rows)


# ----------------------------------------------------------------------------------------------
# defects and errors
# ----------------------------------------------------------------------------------------------


def _voc(root: Path, n_images: int = 2) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for i in range(n_images):
        Image.new("RGB", (64, 48), (200, 150, 150)).save(root / "JPEGImages" / f"im{i}.jpg")
    return root


def _write_voc(root: Path, name: str, objects: list[tuple[str, tuple[float, ...]]], image: str | None = None) -> None:
    item = Annotation(root / "JPEGImages" / (image or f"{name}.jpg"), 64, 48,
                      np.array([o[1] for o in objects], dtype=float).reshape(-1, 4), [o[0] for o in objects])
    (root / "Annotations" / f"{name}.xml").write_text(voc_xml(item, "JPEGImages"))


def test_voc_defects_are_repaired_and_counted(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", 3)
    _write_voc(root, "im0", [("WBC", (10, 10, 30, 30)), ("RBC", (50, 40, 70, 60)),  # clipped to 64 x 48
                             ("RBC", (20, 5, 21, 6)),  # 1-pixel box (BCCD's BloodImage_00338)
                             ("WBC", (10, 10, 30, 30.2))])  # duplicate
    _write_voc(root, "im1", [("Platelets", (1, 1, 9, 9))])
    data = read_detection(root)  # im2.jpg has no annotation file
    assert data.format == "voc" and data.classes == ["platelets", "rbc", "wbc"]
    assert [it.image.name for it in data.items] == ["im0.jpg", "im1.jpg"]
    np.testing.assert_allclose(data.items[0].boxes, [[10, 10, 30, 30], [50, 40, 64, 48]])
    assert data.items[0].labels == ["wbc", "rbc"]
    r = data.repairs
    assert (r.clipped, r.tiny, r.duplicates, r.unannotated) == (1, 1, 1, 1)
    line = r.summary()
    assert line is not None and "\n" not in line
    for needle in ("1 box(es) clipped", "1 box(es) under 2 px", "1 duplicated", "im2.jpg", "im0.xml"):
        assert needle in line


def test_voc_splits_from_image_sets(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", 2)
    _write_voc(root, "im0", [("WBC", (10, 10, 30, 30))])
    _write_voc(root, "im1", [("WBC", (10, 10, 30, 30))])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("im1\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("im0\n")
    assert read_detection(root).splits == {"train": [1], "val": [0]}


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    def fails(path: Path, needle: str) -> None:
        with pytest.raises(LeukolabError, match=needle) as info:
            read_detection(path)
        assert "\n" not in str(info.value)

    (tmp_path / "plain").mkdir()
    fails(tmp_path / "plain", "not a detection data set")
    root = _voc(tmp_path / "missing", 1)
    _write_voc(root, "im0", [("WBC", (10, 10, 30, 30))], image="nowhere.jpg")
    fails(root, "nowhere.jpg.*does not exist")
    root = _voc(tmp_path / "empty", 1)
    _write_voc(root, "im0", [("WBC", (10, 10, 10.5, 30))])
    fails(root, "no valid box")
    root = _voc(tmp_path / "corrupt", 1)
    (root / "JPEGImages" / "im0.jpg").write_bytes(b"not a jpeg")
    _write_voc(root, "im0", [("WBC", (10, 10, 30, 30))])
    fails(root, "im0.jpg")
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    Image.new("RGB", (64, 48)).save(yolo / "images" / "a.png")
    (yolo / "classes.txt").write_text("WBC\nRBC\n")
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    fails(yolo, r"labels/a.txt line 2: class 7 is not in the class list")


def test_yolo_missing_label_file_is_background(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (100, 50)).save(root / "images" / f"{name}.png")
    (root / "data.yaml").write_text("names: {0: WBC, 1: Platelets}\n")
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    data = read_detection(root)
    assert data.format == "yolo" and data.classes == ["wbc", "platelets"]
    assert [len(it.boxes) for it in data.items] == [1, 0]
    np.testing.assert_allclose(data.items[0].boxes, [[40, 15, 60, 35]])
    assert data.repairs.unannotated == 1 and "taken as background" in (data.repairs.summary() or "")


def test_coco_reader_with_split_files(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48)).save(root / "images" / name)
    for split, name in (("train", "a.jpg"), ("val", "b.jpg")):
        doc = {"images": [{"id": 7, "file_name": name, "width": 64, "height": 48}],
               "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [60, 4, 10, 10], "iscrowd": 0}],
               "categories": [{"id": 3, "name": "WBC"}]}
        (root / f"instances_{split}.json").write_text(json.dumps(doc))
    data = read_detection(root)
    assert data.format == "coco" and data.classes == ["wbc"]
    assert data.splits == {"train": [0], "val": [1]}
    np.testing.assert_allclose(data.items[0].boxes, [[60, 4, 64, 14]])  # clipped
    assert data.repairs.clipped == 2


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared BCCD data not present")
def test_bccd_trainval_reads_with_its_one_pixel_box_repaired() -> None:
    data = read_detection(BCCD)
    assert data.format == "voc" and len(data) == 292
    assert data.classes == ["platelets", "rbc", "wbc"]
    assert data.repairs.tiny >= 1
    n_wbc = sum(it.labels.count("wbc") for it in data.items)
    assert 280 <= n_wbc <= 310


# ----------------------------------------------------------------------------------------------
# dataset, transforms, collate
# ----------------------------------------------------------------------------------------------


def test_rot90_moves_boxes_with_the_pixels() -> None:
    from torchvision import tv_tensors

    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    img[:, 5:15, 10:30] = 255
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 5.0, 30.0, 15.0]]), format="XYXY", canvas_size=(40, 60))
    rot = RandomRot90()
    for angle in (90, 180, 270):
        out_img = rot.transform(tv_tensors.Image(img), {"angle": angle})
        out_boxes = rot.transform(boxes, {"angle": angle})
        ys, xs = torch.nonzero(out_img[0] > 0, as_tuple=True)
        expected = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert out_boxes[0].tolist() == expected


def test_dataset_and_collate(smears: Path) -> None:
    data = read_detection(smears)
    train = DetectionDataset(data, detection_train_transform(96))
    images, targets = detection_collate([train[i] for i in range(3)])
    assert images.shape == (3, 3, 96, 96) and images.dtype == torch.uint8
    for t in targets:
        b = t["boxes"]
        assert b.dtype == torch.float32 and len(b) == len(t["labels"])
        assert (b[:, 2:] - b[:, :2] >= 2).all() and (b >= 0).all() and (b <= 96).all()
    ev = DetectionDataset(data, detection_eval_transform(128))
    image, target = ev[0]
    assert tuple(image.shape) == (3, 96, 128) and target["scale"] == (0.8, 0.8)
    np.testing.assert_allclose(target["boxes"].numpy(), data.items[0].boxes * 0.8, atol=1e-4)
    images, _ = detection_collate([ev[0], ev[1]], size_divisible=32)
    assert images.shape[-2:] == (96, 128)
    images, _ = detection_collate([ev[0]], size_divisible=64)
    assert images.shape[-2:] == (128, 128)
    with pytest.raises(LeukolabError, match="not one of the model's classes"):
        DetectionDataset(data, classes=["wbc"])
