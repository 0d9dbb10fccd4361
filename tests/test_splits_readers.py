from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from leukolab.data.readers import read_labelled
from leukolab.data.splits import label_fraction_subset, stratified_split
from leukolab.errors import LeukolabError

LABELS = ["a"] * 176 + ["b"] * 618 + ["c"] * 2015 + ["d"] * 466 + ["e"] * 5172


def test_stratified_split_keeps_ratios_and_is_deterministic() -> None:
    s1 = stratified_split(LABELS, 0.15, 0.15, seed=3)
    s2 = stratified_split(LABELS, 0.15, 0.15, seed=3)
    s3 = stratified_split(LABELS, 0.15, 0.15, seed=4)
    assert s1 == s2 and s1 != s3
    all_idx = s1["train"] + s1["val"] + s1["test"]
    assert sorted(all_idx) == list(range(len(LABELS)))
    for part in ("val", "test"):
        counts = Counter(LABELS[i] for i in s1[part])
        for c, n in Counter(LABELS).items():
            assert abs(counts[c] - 0.15 * n) <= 2


def test_label_fractions_are_stratified_nested_and_at_least_one_per_class() -> None:
    subsets = {f: set(label_fraction_subset(LABELS, f, seed=1)) for f in (1.0, 0.5, 0.1, 0.01)}
    assert subsets[0.01] <= subsets[0.1] <= subsets[0.5] <= subsets[1.0]
    counts = Counter(LABELS[i] for i in subsets[0.01])
    # the seed-000 WBC_1 convention: floor(1 %), at least one image per class
    assert counts == {"a": 1, "b": 6, "c": 20, "d": 4, "e": 51}
    counts10 = Counter(LABELS[i] for i in subsets[0.1])
    assert counts10 == {"a": 17, "b": 61, "c": 201, "d": 46, "e": 517}
    assert label_fraction_subset(LABELS, 0.1, seed=1) == label_fraction_subset(LABELS, 0.1, seed=1)
    assert label_fraction_subset(LABELS, 0.1, seed=1) != label_fraction_subset(LABELS, 0.1, seed=2)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_outside_range_is_refused(fraction: float) -> None:
    with pytest.raises(LeukolabError, match="outside"):
        label_fraction_subset(LABELS, fraction)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 100, 100)).save(path)


def test_image_folder_ignores_masks_and_reads_splits(tmp_path: Path) -> None:
    for c in ("x", "y"):
        _img(tmp_path / "flat" / c / "1.png")
        _img(tmp_path / "flat" / "masks" / c / "1.png")
        for s in ("train", "val"):
            _img(tmp_path / "split" / s / c / "1.png")
    flat = read_labelled(tmp_path / "flat")
    assert list(flat) == ["all"] and flat["all"].class_names == ["x", "y"]
    split = read_labelled(tmp_path / "split")
    assert set(split) == {"train", "val"}


def test_csv_reader_resolves_relative_paths(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    (tmp_path / "d.csv").write_text("path,label\nimgs/a.png,x\nimgs/b.png,y\n")
    data = read_labelled(tmp_path / "d.csv")["all"]
    assert data.labels == ["x", "y"] and all(p.is_file() for p in data.paths)


def test_reader_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(LeukolabError, match="does not exist"):
        read_labelled(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeukolabError, match="no class folders"):
        read_labelled(tmp_path / "empty")
    _img(tmp_path / "one" / "x" / "1.png")
    with pytest.raises(LeukolabError, match="at least 2"):
        read_labelled(tmp_path / "one")
    (tmp_path / "one" / "y").mkdir()
    with pytest.raises(LeukolabError, match=r"class folder .*y holds no images"):
        read_labelled(tmp_path / "one")
    (tmp_path / "bad.csv").write_text("file,cls\na,b\n")
    with pytest.raises(LeukolabError, match="missing column"):
        read_labelled(tmp_path / "bad.csv")


def test_a_missing_test_split_is_carved_out_of_train(tmp_path: Path) -> None:
    from leukolab.config import resolve
    from leukolab.pipelines.classify import make_splits

    for split, n in (("train", 20), ("val", 4)):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(d / f"{c}{i}.png")
    cfg = resolve("train", None, {"data.path": str(tmp_path)})
    s = make_splits(cfg["data"], seed=0)
    assert len(s.val) == 8 and all("/val/" in str(p) for p in s.val.paths)
    assert len(s.test) == 6 and all("/train/" in str(p) for p in s.test.paths)
    assert not set(s.test.paths) & set(s.train.paths)
    assert len(s.train) == 34


def test_large_images_are_shrunk_on_decoding(tmp_path: Path) -> None:
    from leukolab.data.dataset import ImageDataset

    Image.new("RGB", (360, 300), (200, 10, 10)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(tmp_path / "small.png")
    ds = ImageDataset([tmp_path / "big.png", tmp_path / "small.png"], cache=True, max_side=128)
    assert ds.image(0).size == (128, 107) and ds.image(0).getpixel((5, 5)) == (200, 10, 10)
    assert ds.image(1).size == (40, 40)  # never enlarged
    assert ImageDataset([tmp_path / "big.png"]).image(0).size == (360, 300)
