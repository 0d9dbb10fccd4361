"""Tests for the procedural synthetic WBC / tissue generator (leukolab.data.synthetic)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukolab.data.synthetic import (
    WBC_CLASSES,
    make_pool,
    make_wbc_dataset,
    render_cell,
    render_tissue_patch,
)
from leukolab.errors import LeukolabError


def _render(label: str, seed: int, size: int = 48, difficulty: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    return render_cell(label, size, np.random.default_rng(seed), difficulty)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------
# render_cell / render_tissue_patch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", WBC_CLASSES)
def test_render_cell_types_and_shapes(label: str) -> None:
    img, mask = _render(label, 0, size=40)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert mask.shape == (40, 40) and mask.dtype == np.bool_


@pytest.mark.parametrize("label", WBC_CLASSES)
def test_same_seed_same_image_different_seed_different_image(label: str) -> None:
    a_img, a_mask = _render(label, 123)
    b_img, b_mask = _render(label, 123)
    c_img, _ = _render(label, 124)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("label", WBC_CLASSES)
def test_mask_is_a_plausible_cell(label: str, difficulty: float) -> None:
    size = 48
    for seed in range(4):
        img, mask = _render(label, seed, size, difficulty)
        area = mask.mean()
        assert 0.05 < area < 0.9, f"{label}: mask covers {area:.2f} of the crop"
        assert mask[size // 2, size // 2], f"{label}: mask misses the crop centre"
        # the masked cell differs in colour from the smear around it
        inside = img[mask].astype(float).mean(axis=0)
        outside = img[~mask].astype(float).mean(axis=0)
        assert np.abs(inside - outside).sum() > 10


def test_cell_sizes_follow_morphology() -> None:
    """Lymphocytes are the smallest cells and monocytes the largest, on average."""
    area = {c: np.mean([_render(c, s, 40, 0.5)[1].mean() for s in range(25)]) for c in WBC_CLASSES}
    assert area["lymphocyte"] < area["basophil"] < area["monocyte"]
    assert area["lymphocyte"] < area["neutrophil"] < area["monocyte"]
    assert area["lymphocyte"] < area["eosinophil"] < area["monocyte"]
    assert area["monocyte"] / area["lymphocyte"] > 1.5


def test_classes_look_different() -> None:
    """The average look of the cell (centre colour and texture) differs between every pair of classes."""
    centre = slice(10, 22)
    feats = {}
    for c in WBC_CLASSES:
        f = []
        for s in range(40):
            img = _render(c, s, 32, 0.3)[0].astype(float)
            patch = img[centre, centre]
            redness = (patch[..., 0] - patch[..., 2]).mean() - (img[..., 0] - img[..., 2]).mean()
            f.append([*patch.reshape(-1, 3).mean(axis=0), patch.mean(axis=2).std(), redness])
        feats[c] = np.array(f)
    for i, a in enumerate(WBC_CLASSES):
        for b in WBC_CLASSES[i + 1 :]:
            diff = feats[a].mean(axis=0) - feats[b].mean(axis=0)
            se = np.sqrt((feats[a].var(axis=0) + feats[b].var(axis=0)) / 40)
            assert np.max(np.abs(diff) / se) > 5, f"{a} vs {b} look alike on average"
    means = {c: f.mean(axis=0) for c, f in feats.items()}
    # eosinophils are the reddest cells, basophils / lymphocytes the darkest
    assert max(WBC_CLASSES, key=lambda c: means[c][4]) == "eosinophil"
    assert min(WBC_CLASSES, key=lambda c: means[c][:3].mean()) in ("basophil", "lymphocyte")


def test_difficulty_increases_variation() -> None:
    """The spread of per-image colour grows with difficulty."""

    def spread(d: float) -> float:
        cols = [_render("neutrophil", s, 32, d)[0].reshape(-1, 3).mean(axis=0) for s in range(30)]
        return float(np.std(cols, axis=0).mean())

    assert spread(0.0) < spread(0.5) < spread(1.0)


def test_render_cell_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(LeukolabError, match="platelet"):
        render_cell("platelet", 64, rng)
    with pytest.raises(LeukolabError, match="size"):
        render_cell("monocyte", 8, rng)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(LeukolabError, match="difficulty"):
            render_cell("monocyte", 64, rng, bad)


def test_render_tissue_patch() -> None:
    a = render_tissue_patch(48, np.random.default_rng(5))
    b = render_tissue_patch(48, np.random.default_rng(5))
    c = render_tissue_patch(48, np.random.default_rng(6))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # H&E-like: pink overall (red above green), with some dark (nuclear) pixels
    rgb = a.reshape(-1, 3).astype(float)
    assert rgb[:, 0].mean() > rgb[:, 1].mean()
    assert (rgb.mean(axis=1) < 140).any()
    with pytest.raises(LeukolabError, match="size"):
        render_tissue_patch(4, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# make_wbc_dataset
# ----------------------------------------------------------------------------------------------


def test_make_wbc_dataset_layout(tmp_path: Path) -> None:
    out = make_wbc_dataset(tmp_path / "ds", n_per_class=3, size=32, seed=1, progress=False)
    assert out == tmp_path / "ds"
    rows = _read_csv(out / "metadata.csv")
    assert list(rows[0]) == ["path", "label", "mask_path"]
    assert len(rows) == 3 * len(WBC_CLASSES)
    for c in WBC_CLASSES:
        assert sorted(p.name for p in (out / c).iterdir()) == [f"{c}_{i:05d}.png" for i in range(3)]
        assert sum(r["label"] == c for r in rows) == 3
    for r in rows:
        assert r["path"] == f"{r['label']}/{Path(r['path']).name}"
        assert r["mask_path"] == f"masks/{r['path']}"
        with Image.open(out / r["path"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        with Image.open(out / r["mask_path"]) as m:
            assert m.mode == "L" and m.size == (32, 32)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values == {0, 255}
    assert sorted(p.name for p in out.iterdir()) == sorted([*WBC_CLASSES, "masks", "metadata.csv"])
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"], "temporary folder left behind"


def test_make_wbc_dataset_is_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    kw = {"size": 24, "difficulty": 0.7, "progress": False}
    a = _files(make_wbc_dataset(tmp_path / "a", n_per_class=2, seed=7, **kw))
    b = _files(make_wbc_dataset(tmp_path / "b", n_per_class=2, seed=7, **kw))
    assert a == b
    c = _files(make_wbc_dataset(tmp_path / "c", n_per_class=2, seed=8, **kw))
    assert all(a[k] != c[k] for k in a if k.endswith(".png") and not k.startswith("masks"))
    # more images, or fewer classes, leave the shared images unchanged
    more = _files(make_wbc_dataset(tmp_path / "more", n_per_class=3, seed=7, **kw))
    sub = _files(make_wbc_dataset(tmp_path / "sub", n_per_class=2, seed=7, classes=["monocyte"], **kw))
    for k, v in a.items():
        if k.endswith(".png"):
            assert more[k] == v
    assert sub["monocyte/monocyte_00001.png"] == a["monocyte/monocyte_00001.png"]


def test_make_wbc_dataset_accepts_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = make_wbc_dataset(tmp_path / "empty", n_per_class=1, size=16, classes=["basophil"], progress=False)
    assert (out / "basophil" / "basophil_00000.png").is_file()
    assert len(_read_csv(out / "metadata.csv")) == 1


def test_make_wbc_dataset_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LeukolabError, match="not empty"):
        make_wbc_dataset(out, n_per_class=1, size=16, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(LeukolabError):
        make_wbc_dataset(a_file, n_per_class=1, size=16, progress=False)
    assert a_file.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_per_class": 0}, "n_per_class"),
        ({"size": 15}, "size"),
        ({"difficulty": -0.01}, "difficulty"),
        ({"difficulty": 1.01}, "difficulty"),
        ({"classes": ["lymphocyte", "platelet"]}, "platelet"),
        ({"classes": ["monocyte", "monocyte"]}, "duplicates"),
        ({"classes": []}, "classes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_make_wbc_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = {"n_per_class": 1, "size": 16, "progress": False, **kwargs}
    with pytest.raises(LeukolabError, match=needle) as info:
        make_wbc_dataset(tmp_path / "ds", **args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ds").exists()


# ----------------------------------------------------------------------------------------------
# make_pool
# ----------------------------------------------------------------------------------------------


def test_make_pool(tmp_path: Path) -> None:
    out = make_pool(tmp_path / "pool", n=40, size=24, seed=3, tissue_fraction=0.3, progress=False)
    rows = _read_csv(out / "pool.csv")
    assert list(rows[0]) == ["path", "kind"]
    assert len(rows) == 40
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(r["path"] for r in rows) and len(pngs) == 40
    kinds = [r["kind"] for r in rows]
    assert set(kinds) == {"wbc", "tissue"}
    assert abs(kinds.count("tissue") / 40 - 0.3) <= 0.05
    with Image.open(out / rows[0]["path"]) as im:
        assert im.mode == "RGB" and im.size == (24, 24)
    # deterministic, and a larger pool starts with the same images
    again = make_pool(tmp_path / "again", n=41, size=24, seed=3, tissue_fraction=0.3, progress=False)
    for r in rows:
        assert (again / r["path"]).read_bytes() == (out / r["path"]).read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_make_pool_extreme_fractions(tmp_path: Path, fraction: float) -> None:
    out = make_pool(tmp_path / "pool", n=6, size=16, tissue_fraction=fraction, progress=False)
    kinds = {r["kind"] for r in _read_csv(out / "pool.csv")}
    assert kinds == ({"tissue"} if fraction == 1.0 else {"wbc"})


def test_make_pool_refuses(tmp_path: Path) -> None:
    for kwargs, needle in (
        ({"n": 0}, "n must"),
        ({"tissue_fraction": 1.2}, "tissue_fraction"),
        ({"size": 3}, "size"),
        ({"difficulty": 2}, "difficulty"),
    ):
        with pytest.raises(LeukolabError, match=needle):
            make_pool(tmp_path / "p", **{"n": 2, "size": 16, "progress": False, **kwargs})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"x")
    with pytest.raises(LeukolabError, match="not empty"):
        make_pool(tmp_path / "full", n=2, size=16, progress=False)
    assert (tmp_path / "full" / "x.png").read_bytes() == b"x"


# ----------------------------------------------------------------------------------------------
# package internals shared by the crop and smear renderers
# ----------------------------------------------------------------------------------------------


def test_rectangular_fields_extend_the_square_ones() -> None:
    from leukolab.data.synthetic.raster import coords, fourier_field

    np.testing.assert_allclose(coords(5), [-0.8, -0.4, 0.0, 0.4, 0.8])
    np.testing.assert_allclose(coords(3, 6), [-1 / 3, 0.0, 1 / 3])  # same pixel pitch as a 6-pixel side
    square = fourier_field(np.random.default_rng(1), 24, 3, 2.0)
    same = fourier_field(np.random.default_rng(1), 24, 3, 2.0, width=24)
    np.testing.assert_array_equal(square, same)
    wide = fourier_field(np.random.default_rng(1), 12, 3, 2.0, width=24)
    assert wide.shape == (12, 24)
    np.testing.assert_allclose(wide, square[6:18], atol=1e-5)  # the central rows of the square field


def test_cell_layer_is_the_cell_that_render_cell_draws() -> None:
    """Without a backdrop the layer is zero outside the cell and covers exactly render_cell's mask."""
    from leukolab.data.synthetic.cells import cell_layer

    for label in WBC_CLASSES:
        layer, cover = cell_layer(label, 48, np.random.default_rng(3), 0.5, backdrop=False)
        _, mask = render_cell(label, 48, np.random.default_rng(3), 0.5)
        assert layer.shape == (48, 48, 3) and cover.shape == (48, 48)
        assert np.array_equal(cover >= 0.5, mask)
        assert np.abs(layer[cover == 0]).max() == 0.0
        assert layer[mask].mean() > 0.1  # stained: positive optical density inside
