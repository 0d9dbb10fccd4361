"""``--balance augment`` with cell masks: every copy carries its source's mask under the copy's flip / rotation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukolab.data.balance import (
    COPIES_CSV,
    CopyTransform,
    DihedralFlip,
    augment_copies,
    default_copy_transform,
    read_copies,
    read_copy_masks,
)
from leukolab.errors import LeukolabError

torch.set_num_threads(1)

#: the 8 dihedral transforms of PIL (None: the identity)
DIHEDRAL = (None, *DihedralFlip._SQUARE)


def _asymmetric_mask(h: int, w: int) -> np.ndarray:
    """An L-shaped blob near the top-left corner: no flip or rotation maps it onto itself."""
    m = np.zeros((h, w), dtype=bool)
    m[2:h // 2, 3:7] = True
    m[h // 2 - 4:h // 2, 3:w // 2 + 2] = True
    return m


def _write(folder: Path, name: str, img: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(exist_ok=True)
    Image.fromarray(img).save(folder / "img" / name)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask" / name)
    return folder / "img" / name, folder / "mask" / name


def _apply(op: Image.Transpose | None, a: np.ndarray) -> np.ndarray:
    im = Image.fromarray(a)
    return np.asarray(im if op is None else im.transpose(op))


def _closest_op(src: np.ndarray, copy: np.ndarray) -> Image.Transpose | None:
    """The dihedral transform that maps ``src`` nearest to ``copy`` (same shape only)."""
    diffs = [(np.abs(_apply(op, src).astype(float) - copy).mean(), i) for i, op in enumerate(DIHEDRAL)
             if _apply(op, src).shape == copy.shape]
    return DIHEDRAL[min(diffs)[1]]


@pytest.mark.parametrize("size", [(24, 24), (20, 28)])  # square: all 7 non-identity transforms; else 3
def test_each_copy_carries_its_source_mask_under_the_same_transform(tmp_path: Path, size: tuple[int, int]) -> None:
    h, w = size
    rng = np.random.default_rng(0)
    paths, masks, labels = [], [], []
    for i in range(4):  # majority class: 4 images, no masks needed
        p, _ = _write(tmp_path / "a", f"a{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), np.ones((h, w)))
        paths.append(p), masks.append(None), labels.append("a")
    src_img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # rare class: 1 image with an asymmetric mask
    src_mask = _asymmetric_mask(h, w)
    p, m = _write(tmp_path / "b", "b0.png", src_img, src_mask)
    paths.append(p), masks.append(m), labels.append("b")

    out = tmp_path / "balanced"
    new_paths, new_labels, counts = augment_copies(paths, labels, out, seed=3, masks=masks, progress=False)
    assert counts == {"a": 4, "b": 4} and new_labels.count("b") == 4
    copy_masks = read_copy_masks(out)
    copies = [q for q in new_paths if q.is_relative_to(out)]
    assert len(copies) == 3 and set(copy_masks) == set(copies)
    seen = set()
    for q in copies:
        img, mask = np.asarray(Image.open(q)), np.asarray(Image.open(copy_masks[q])) > 127
        assert mask.shape == img.shape[:2]
        op = _closest_op(src_img, img)  # the copy's geometric transform (its colours are jittered a little)
        assert op is not None
        np.testing.assert_array_equal(mask, _apply(op, src_mask))
        assert not np.array_equal(mask, src_mask) if mask.shape == src_mask.shape else True
        seen.add(op)
    assert len(seen) >= 2  # the copies are not all the same transform
    # the copies themselves are the same files with or without masks (same RNG draws)
    plain, _, _ = augment_copies(paths, labels, tmp_path / "plain", seed=3, progress=False)
    for a, b in zip(copies, [q for q in plain if q.is_relative_to(tmp_path / "plain")], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert read_copy_masks(tmp_path / "plain") == {}
    assert read_copies(out)[0] == copies
    with open(out / COPIES_CSV, newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["path", "label", "source", "mask"]


def test_masks_need_a_transform_that_moves_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p1, m1 = _write(tmp_path, "x.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), _asymmetric_mask(16, 16))
    p2, _ = _write(tmp_path, "y.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), _asymmetric_mask(16, 16))
    with pytest.raises(LeukolabError, match="has no pair"):
        augment_copies([p1, p2, p2], ["b", "a", "a"], tmp_path / "o", 0, DihedralFlip().__call__,
                       masks=[m1, None, None], progress=False)
    with pytest.raises(LeukolabError, match="3 paths but 1 masks"):
        augment_copies([p1, p2, p2], ["b", "a", "a"], tmp_path / "o", 0, masks=[m1], progress=False)
    assert isinstance(default_copy_transform(), CopyTransform)


def test_a_training_run_uses_the_copies_masks_instead_of_estimating_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Stops at the training loader (no training): the loader's image options hold each copy's moved mask."""
    import leukolab.pipelines.classify as classify
    from leukolab.data.synthetic import make_wbc_dataset

    data = make_wbc_dataset(tmp_path / "data", 4, size=32, seed=0, classes=("lymphocyte", "neutrophil"),
                            progress=False)
    for p in sorted((data / "lymphocyte").glob("*.png"))[1:]:  # 1 lymphocyte vs 4 neutrophils
        p.unlink()
    src = sorted((data / "lymphocyte").glob("*.png"))[0]
    src_mask_file = data / "masks" / "lymphocyte" / src.name
    src_mask = _asymmetric_mask(32, 32)
    Image.fromarray(src_mask.astype(np.uint8) * 255).save(src_mask_file)

    class Stop(Exception):
        pass

    captured = {}

    def fake_loader(*args: object, **kwargs: object) -> None:
        captured["images"] = kwargs["images"]
        raise Stop

    monkeypatch.setattr(classify, "make_loader", fake_loader)
    with pytest.raises(Stop):
        classify.train_classifier(tmp_path / "runs", overrides={
            "data.path": str(data), "data.img_size": 32, "model.backbone": "resnet10t", "train.progress": False,
            "train.device": "cpu", "data.check_images": False, "data.val_fraction": 0.0, "data.test_fraction": 0.0,
            "data.crop": "cell", "data.balance": "augment", "seed": 0,
        })
    mask_files = captured["images"].mask_files
    run = next((tmp_path / "runs").iterdir())
    copies, labels = read_copies(run / "balanced")
    assert labels == ["lymphocyte"] * 3
    src_img = np.asarray(Image.open(src).convert("RGB"))
    for q in copies:
        assert q in mask_files  # given, not estimated
        moved = np.asarray(Image.open(mask_files[q])) > 127
        op = _closest_op(src_img, np.asarray(Image.open(q)))
        np.testing.assert_array_equal(moved, _apply(op, src_mask))
        assert not np.array_equal(moved, src_mask)
