"""``leukolab dedup`` and ``leukolab split``: duplicates found whatever the flip, rotation or re-save, different
cells never matched, leakage across sets reported; folds stratified, grouped and deterministic."""

from __future__ import annotations

import shutil
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.dedup import DEFAULT_THRESHOLD, _pixel_views, _reduced_gray, compute_hashes, dihedral_phash
from leukolab.data.folds import multilabel_folds, stratified_folds
from leukolab.data.synthetic import make_wbc_dataset


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 different 64-px synthetic cells per class (20 images), medium difficulty."""
    return make_wbc_dataset(tmp_path_factory.mktemp("cells") / "data", 4, size=64, seed=3, difficulty=0.5,
                            progress=False)


def _class_folders(cells: Path, dst: Path) -> Path:
    return Path(shutil.copytree(cells, dst, ignore=shutil.ignore_patterns("masks", "metadata.csv")))


# ------------------------------------------------------------------------------------------------ hashing


def test_dihedral_hashes_are_imagehash_phash_of_each_view(cells: Path) -> None:
    for path in sorted(cells.glob("*/*_0000[01].png")):
        gray = _reduced_gray(path)
        ours = dihedral_phash(gray)
        for v, view in enumerate(_pixel_views(gray)):
            reference = imagehash.phash(Image.fromarray(np.ascontiguousarray(view)), hash_size=16).hash.ravel()
            assert np.array_equal(ours[v], reference), (path.name, v)
    assert not np.array_equal(ours[0], ours[2])  # the views differ, so the comparison above is not vacuous


# ------------------------------------------------------------------------------------------------ dedup


def _add_copies(data: Path) -> dict[str, str]:
    """Copies of four originals: flipped, rotated, re-saved as JPEG, and a byte copy; {copy name: original name}."""
    originals = sorted(data.glob("lymphocyte/*.png"))[:2] + sorted(data.glob("neutrophil/*.png"))[:2]
    made = {}
    for src, (tag, op) in zip(originals, [
        ("flip", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("rot90", lambda im: im.transpose(Image.Transpose.ROTATE_90)),
        ("jpeg", lambda im: im.transpose(Image.Transpose.TRANSPOSE)),
        ("bytes", None),
    ], strict=True):
        dst = src.with_name(f"{src.stem}_{tag}{'.jpg' if tag == 'jpeg' else '.png'}")
        if op is None:
            shutil.copyfile(src, dst)
        elif tag == "jpeg":
            op(Image.open(src).convert("RGB")).save(dst, quality=75)
        else:
            op(Image.open(src)).save(dst)
        made[dst.name] = src.name
    return made


def test_dedup_finds_flipped_rotated_and_jpeg_copies_and_nothing_else(
    cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(cells, tmp_path / "data")
    copies = _add_copies(data)
    out = tmp_path / "dups.csv"
    code, stdout, err = run_cli(["dedup", str(data), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    table = pd.read_csv(out)
    clusters = {frozenset(Path(p).name for p in g["path"]) for _, g in table.groupby("cluster")}
    # exactly the four (original, copy) pairs: no different cell of the same class joins any of them
    assert clusters == {frozenset({c, o}) for c, o in copies.items()}
    kinds = dict(zip(table["path"].map(lambda p: Path(p).name), table["kind"], strict=True))
    assert kinds["lymphocyte_00000_flip.png"] == "near" and kinds["neutrophil_00001_bytes.png"] == "exact"
    assert (table["distance"] <= DEFAULT_THRESHOLD).all()
    assert set(table["label"]) == {"lymphocyte", "neutrophil"}
    assert "exact duplicates (identical files): 1 groups, 2 images" in stdout
    assert "3 clusters, 6 images" in stdout  # the near ones: flip, rot90, jpeg


def test_different_cells_are_far_apart(cells: Path) -> None:
    """The default threshold leaves a margin: same-class synthetic cells differ by far more bits."""
    from leukolab.data.dedup import near_pairs

    hashes = compute_hashes(sorted(cells.glob("*/*.png")), show_progress=False)
    i, _, d = near_pairs(hashes.bits, 256)
    assert len(i) == len(hashes) * (len(hashes) - 1) // 2  # every pair was compared
    assert d.min() > DEFAULT_THRESHOLD + 8


def test_cli_default_threshold_is_the_libraries() -> None:
    from leukolab.cli import datatools

    assert datatools.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD


def test_dedup_across_reports_the_leaked_image(cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _class_folders(cells, tmp_path / "train")
    test = tmp_path / "test"  # an unlabelled image folder: a rotated copy of one training image and two new cells
    test.mkdir()
    Image.open(train / "basophil" / "basophil_00002.png").transpose(Image.Transpose.ROTATE_270).save(test / "a.png")
    extra = make_wbc_dataset(tmp_path / "extra", 1, size=64, seed=99, classes=("basophil", "monocyte"),
                             progress=False)
    for p in extra.glob("*/*.png"):
        shutil.copyfile(p, test / p.name)
    out = tmp_path / "leak.csv"
    code, stdout, err = run_cli(["dedup", str(train), "--across", str(test), "--out", str(out), "--no-progress"],
                                capsys)
    assert code == 0, err
    assert "(leakage): 1 of 20 (0 identical files)" in stdout
    table = pd.read_csv(out)
    assert sorted(zip(table["set"], table["path"].map(lambda p: Path(p).name), strict=True)) == [
        ("data", "basophil_00002.png"), ("other", "a.png")]


def test_dedup_writes_a_new_file_each_time(cells: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for expected in ("dedup.csv", "dedup-2.csv"):
        code, stdout, _ = run_cli(["dedup", str(cells), "--no-progress"], capsys)
        assert code == 0 and f"wrote {expected}" in stdout
    assert list(pd.read_csv(tmp_path / "dedup.csv").columns)[:4] == ["cluster", "set", "split", "path"]


# ------------------------------------------------------------------------------------------------ folds


def test_stratified_folds_keep_class_shares(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    out = tmp_path / "folds.csv"
    code, stdout, err = run_cli(["split", str(wbc_small), "--folds", "5", "--seed", "1", "--out", str(out)], capsys)
    assert code == 0, err
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "label", "fold"]
    assert len(table) == 150 and all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])
    counts = table.groupby(["fold", "label"]).size().unstack()
    assert counts.shape == (5, 5) and (counts == 6).all().all()  # 30 per class -> exactly 6 per fold
    assert "fold 4" in stdout


def test_same_seed_same_folds(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folds = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli(["split", str(wbc_small), "--folds", "3", "--seed", str(seed), "--out",
                        str(tmp_path / f"{name}.csv")], capsys)[0] == 0
        folds.append(pd.read_csv(tmp_path / f"{name}.csv")["fold"].tolist())
    assert folds[0] == folds[1] and folds[0] != folds[2]


def _groups_intact(fold: np.ndarray, groups: list[str]) -> bool:
    return all(len(set(fold[np.asarray(groups) == g])) == 1 for g in set(groups))


def test_grouped_single_label_folds_keep_groups_and_class_shares() -> None:
    rng = np.random.default_rng(0)
    labels = [c for c in "abc" for _ in range(60)]
    groups = [f"p{i // 3}" if i % 2 else f"q{i // 4}" for i in range(len(labels))]  # groups of 1-4 images
    rng.shuffle(groups)
    fold = stratified_folds(labels, 4, seed=0, groups=groups)
    assert _groups_intact(fold, groups)
    assert set(fold) == {0, 1, 2, 3}
    for c in "abc":
        share = np.bincount(fold[np.asarray(labels) == c], minlength=4) / 60
        assert np.abs(share - 0.25).max() <= 0.1, (c, share)


def _multilabel_table(paths: list[Path], seed: int = 0) -> pd.DataFrame:
    """Random label sets over four labels of different frequencies, and patients of 1-4 images."""
    rng = np.random.default_rng(seed)
    freq = {"blast": 0.5, "dysplasia": 0.3, "auer_rod": 0.15, "vacuoles": 0.4}
    labels = [";".join(n for n, f in freq.items() if rng.random() < f) for _ in paths]
    patients, k = [], 0
    while len(patients) < len(paths):
        patients += [f"patient{k}"] * int(rng.integers(1, 5))
        k += 1
    return pd.DataFrame({"path": [str(p) for p in paths], "labels": labels, "patient": patients[: len(paths)]})


def test_multilabel_folds_keep_label_shares_and_groups(wbc_small: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(wbc_small.glob("*/*.png"))
    table = _multilabel_table(paths)
    csv = tmp_path / "multi.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "folds.csv"
    code, stdout, err = run_cli(["split", str(csv), "--multilabel", "--group-by", "patient", "--folds", "3",
                                 "--seed", "0", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "groups" in stdout and "auer_rod" in stdout  # the per-fold summary
    folds = pd.read_csv(out)
    assert list(folds.columns) == ["path", "labels", "fold", "group"]
    fold = folds["fold"].to_numpy()
    assert _groups_intact(fold, folds["group"].tolist())
    assert folds["group"].tolist() == table["patient"].tolist()
    for label in ("blast", "dysplasia", "auer_rod", "vacuoles"):
        has = table["labels"].str.contains(label).to_numpy()
        share = np.bincount(fold[has], minlength=3) / has.sum()
        assert np.abs(share - 1 / 3).max() <= 0.1, (label, share)
    assert np.abs(np.bincount(fold) / len(fold) - 1 / 3).max() <= 0.1


def test_multilabel_folds_without_groups_are_tight_and_seeded() -> None:
    rng = np.random.default_rng(1)
    sets = [[n for n, f in (("x", 0.5), ("y", 0.2), ("z", 0.05)) if rng.random() < f] for _ in range(400)]
    fold = multilabel_folds(sets, 5, seed=0)
    for label in "xyz":
        count = np.bincount(fold[[label in s for s in sets]], minlength=5)
        assert count.max() - count.min() <= 1, (label, count)  # iterative stratification: within one image
    assert np.array_equal(fold, multilabel_folds(sets, 5, seed=0))
    assert not np.array_equal(fold, multilabel_folds(sets, 5, seed=1))


def test_split_groups_duplicates_into_one_fold(cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    data = _class_folders(cells, tmp_path / "data")
    copies = _add_copies(data)
    out = tmp_path / "folds.csv"
    code, stdout, err = run_cli(["split", str(data), "--folds", "3", "--group-by", "duplicates", "--out", str(out),
                                 "--no-progress"], capsys)
    assert code == 0, err
    folds = pd.read_csv(out)
    names = folds["path"].map(lambda p: Path(p).name)
    by_name = dict(zip(names, zip(folds["fold"], folds["group"], strict=True), strict=True))
    for copy, original in copies.items():
        assert by_name[copy] == by_name[original]  # same group, same fold
    assert folds["group"].nunique() == len(folds) - len(copies)
    assert "4 clusters of duplicates (8 images)" in stdout


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["split", "{data}", "--folds", "1", "--out", "{out}"], "--folds 1: expected at least 2"),
        (["split", "{data}", "--folds", "31", "--out", "{out}"], "has only 30 image(s); expected at most 30 folds"),
        (["split", "{csv}", "--folds", "2", "--group-by", "ward", "--out", "{out}"], "no column 'ward' to group by"),
        (["split", "{csv}", "--folds", "7", "--group-by", "patient", "--out", "{out}"],
         "folds 7 is larger than the number of groups (6)"),
        (["split", "{csv}", "--folds", "2", "--multilabel", "--out", "{out}"], "expects a CSV with a 'labels' column"),
        (["split", "{data}", "--folds", "2", "--multilabel", "--out", "{out}"], "expects a CSV with a 'labels'"),
        (["split", "{empty}", "--folds", "2", "--out", "{out}"], "no rows"),
        (["split", "{data}", "--folds", "2", "--out", "{data}/metadata.csv"], "already exists"),
        (["split", "{data}", "--out", "{out}"], "Missing option '--folds'"),
        (["dedup", "/no/such/folder"], "/no/such/folder does not exist"),
        (["dedup", "{data}", "--threshold", "300"], "--threshold 300 is outside [0, 256] bits"),
        (["dedup", "{nodata}"], "folder holds no images"),
        (["dedup", "{data}", "--across", "{data}/basophil", "--out", "{out}"], "also in"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(args: list[str], expected: str, wbc_small: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "set.csv"
    paths = sorted(wbc_small.glob("*/*.png"))[:12]
    pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths],
                  "patient": [f"p{i // 2}" for i in range(12)]}).to_csv(csv, index=False)
    (tmp_path / "empty.csv").write_text("path,label\n")
    (tmp_path / "nodata").mkdir()
    subst = {"{data}": str(wbc_small), "{csv}": str(csv), "{out}": str(tmp_path / "out.csv"),
             "{empty}": str(tmp_path / "empty.csv"), "{nodata}": str(tmp_path / "nodata")}
    for key, value in subst.items():
        args = [a.replace(key, value) for a in args]
    code, _, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
    assert not (tmp_path / "out.csv").exists()


def test_split_by_csv_column_writes_the_groups(wbc_small: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(wbc_small.glob("*/*.png"))
    csv = tmp_path / "cells.csv"
    patients = [f"p{i % 25}" for i in range(len(paths))]  # 25 patients, 6 cells each, mixed classes
    pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths], "patient": patients}
                 ).to_csv(csv, index=False)
    out = tmp_path / "folds.csv"
    assert run_cli(["split", str(csv), "--folds", "5", "--group-by", "patient", "--out", str(out)], capsys)[0] == 0
    folds = pd.read_csv(out)
    assert list(folds.columns) == ["path", "label", "fold", "group"] and folds["group"].tolist() == patients
    assert _groups_intact(folds["fold"].to_numpy(), patients)
    assert sorted(folds.groupby("fold")["group"].nunique()) == [5, 5, 5, 5, 5]
