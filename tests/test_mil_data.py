"""MIL data: synthetic patients, the clinical table, the bag reader, patient folds and bag batches."""

from __future__ import annotations

import csv
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukolab.data.mil import (
    BagDataset,
    check_clinical_features,
    collate_bags,
    parse_date,
    patient_folds,
    patient_split,
    read_clinical,
    read_cohort,
)
from leukolab.data.synthetic.patients import (
    ATYPIA,
    CELL_KINDS,
    REFERENCE_DATE,
    PatientOptions,
    draw_patient,
    make_patients,
    render_lymphocyte,
)
from leukolab.errors import LeukolabError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lymphocytosis"
TINY = PatientOptions(n_patients=6, cells_min=2, cells_max=4, size=24, seed=3)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patients(tmp_path_factory.mktemp("mil") / "bags", TINY, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_clinical(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("ID", "LABEL", "GENDER",
                                                                                      "DOB", "LYMPH_COUNT")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# synthetic patients
# ----------------------------------------------------------------------------------------------


def test_synthetic_patients_layout_and_determinism(cohort_dir: Path, tmp_path: Path) -> None:
    again = make_patients(tmp_path / "again", TINY, progress=False)
    assert _files(cohort_dir) == _files(again)  # byte-identical for a seed
    cohort = read_cohort(cohort_dir)
    assert cohort.ids == [f"P{i}" for i in range(6)]
    assert all(2 <= len(p.cells) <= 4 for p in cohort.patients)
    assert Image.open(cohort.patients[0].cells[0]).size == (24, 24)
    kinds = {r["kind"] for r in csv.DictReader(open(cohort_dir / "cells.csv", encoding="utf-8"))}
    assert kinds <= set(CELL_KINDS)
    other = make_patients(tmp_path / "other", PatientOptions(**{**TINY.__dict__, "seed": 4}), progress=False)
    assert _files(other) != _files(cohort_dir)


def test_synthetic_patients_classes_differ_but_overlap() -> None:
    opts = PatientOptions(n_patients=300, cells_min=16, cells_max=200, seed=0)
    pts = [draw_patient(i, opts) for i in range(opts.n_patients)]
    labels = np.array([p.label for p in pts])
    assert 0.65 < labels.mean() < 0.75  # the cohort's ratio
    share = np.array([np.mean([k in ATYPIA for k in p.kinds]) for p in pts])
    count = np.array([p.lymph_count for p in pts])
    age = np.array([(REFERENCE_DATE - p.dob).days / 365.25 for p in pts])
    tum, rea = labels == 1, labels == 0
    assert share[tum].mean() > 5 * share[rea].mean()
    assert np.median(count[tum]) > 2 * np.median(count[rea]) and np.median(age[tum]) > np.median(age[rea]) + 8
    # overlap: some tumoral patients look reactive on each side alone
    assert (share[tum] <= share[rea].max()).any()
    assert (count[tum] < np.percentile(count[rea], 90)).sum() >= 10
    # and a few atypical cells in a big bag: the share can be small
    assert (share[tum] < 0.05).sum() >= 10


def test_render_lymphocyte_kinds_differ() -> None:
    typical = render_lymphocyte("typical", 48, np.random.default_rng(0)).astype(float)
    for kind in ("smudge", "large", "reactive"):
        img = render_lymphocyte(kind, 48, np.random.default_rng(0)).astype(float)
        assert np.abs(img - typical).mean() > 5
    with pytest.raises(LeukolabError, match="unknown lymphocyte kind"):
        render_lymphocyte("blast", 48, np.random.default_rng(0))


def test_synthetic_patient_options_checked() -> None:
    with pytest.raises(LeukolabError, match="cells_max 3 is smaller than cells_min 5"):
        PatientOptions(cells_min=5, cells_max=3).checked()


# ----------------------------------------------------------------------------------------------
# clinical table and bag reader
# ----------------------------------------------------------------------------------------------


def test_parse_date_formats() -> None:
    assert parse_date("1/27/1931") == date(1931, 1, 27)
    assert parse_date("28-04-1943") == date(1943, 4, 28)
    assert parse_date("1943-04-28") == date(1943, 4, 28)
    with pytest.raises(LeukolabError, match="'13/45/1950'"):
        parse_date("13/45/1950")


def test_read_clinical_parses_the_cohort_spellings(tmp_path: Path) -> None:
    path = _write_clinical(tmp_path / "c.csv", [("P1", "1", "m", "1/1/1950", "12.5"), ("P2", "", "F", "01-07-1990",
                                                                                      "4")])
    table = read_clinical(path, reference_date=date(2020, 1, 1))
    assert table["patient"].tolist() == ["P1", "P2"]
    assert table["label"].tolist() == [1, None]
    assert table["gender"].tolist() == ["M", "F"]
    assert table["age"].iloc[0] == pytest.approx(70.0, abs=0.01)
    assert table["age"].iloc[1] == pytest.approx(29.5, abs=0.01)
    header = ("ID", "GENDER", "DOB", "LYMPH_COUNT")
    no_label = _write_clinical(tmp_path / "n.csv", [("P1", "M", "1/1/1950", "3")], header)
    assert read_clinical(no_label)["label"].tolist() == [None]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("P7", "1", "M", "yesterday", "5"), r"patient P7\) DOB: cannot read the date 'yesterday'"),
        (("P7", "1", "M", "1/1/1950", "many"), r"patient P7\): LYMPH_COUNT 'many' is not a positive number"),
        (("P7", "1", "M", "1/1/1950", "-2"), "LYMPH_COUNT '-2'"),
        (("P7", "2", "M", "1/1/1950", "5"), r"patient P7\): LABEL '2' is not 0"),
        (("P7", "1", "X", "1/1/1950", "5"), "GENDER 'X' is not M or F"),
        (("P7", "1", "M", "1/1/2050", "5"), "is after the reference date"),
    ],
)
def test_read_clinical_bad_values(tmp_path: Path, row: tuple[str, ...], message: str) -> None:
    path = _write_clinical(tmp_path / "c.csv", [("P1", "0", "F", "1/1/1960", "5"), row])
    with pytest.raises(LeukolabError, match=message):
        read_clinical(path)


def test_read_cohort_pairs_folders_and_rows(cohort_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "bags"
    shutil.copytree(cohort_dir, root)
    shutil.copytree(root / "P0", root / "P99")
    with pytest.raises(LeukolabError, match=r"patient folder .*P99 has no row in the clinical table"):
        read_cohort(root)
    shutil.rmtree(root / "P99")
    shutil.rmtree(root / "P3")
    with pytest.raises(LeukolabError, match=r"clinical row of patient P3 has no folder"):
        read_cohort(root)
    (root / "P3").mkdir()
    with pytest.raises(LeukolabError, match=r"patient P3: the bag .*P3 holds no images"):
        read_cohort(root)


def test_read_cohort_unlabelled_patients(cohort_dir: Path, tmp_path: Path) -> None:
    rows = [(f"P{i}", "M", "1/1/1950", "5") for i in range(6)]
    csv_path = _write_clinical(tmp_path / "c.csv", rows, ("ID", "GENDER", "DOB", "LYMPH_COUNT"))
    cohort = read_cohort(cohort_dir, csv_path)
    assert not cohort.labelled and (cohort.labels() == -1).all()
    with pytest.raises(LeukolabError, match="patient P0 has no LABEL"):
        read_cohort(cohort_dir, csv_path, require_labels=True)


def test_clinical_features() -> None:
    assert check_clinical_features("gender,AGE") == ("age", "gender")
    assert check_clinical_features("none") == ()
    with pytest.raises(LeukolabError, match="unknown clinical feature 'bmi'"):
        check_clinical_features("age,bmi")


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/lymphocytosis is absent")
def test_read_real_cohort() -> None:
    cohort = read_cohort(REAL)
    assert len(cohort) == 50 and int(cohort.labels().sum()) == 35
    assert all(18 < p.age < 100 for p in cohort.patients)


# ----------------------------------------------------------------------------------------------
# patient folds and splits
# ----------------------------------------------------------------------------------------------


def test_patient_folds_partition_patients_and_keep_class_shares() -> None:
    labels = np.array([1] * 35 + [0] * 15)
    fold = patient_folds(labels, 5, seed=1)
    assert sorted(np.bincount(fold).tolist()) == [10] * 5  # every patient in exactly one fold
    for k in range(5):
        assert (labels[fold == k] == 1).sum() == 7 and (labels[fold == k] == 0).sum() == 3
    assert (patient_folds(labels, 5, seed=1) == fold).all()
    assert (patient_folds(labels, 5, seed=2) != fold).any()


def test_patient_folds_refuse_too_few_patients() -> None:
    with pytest.raises(LeukolabError, match=r"only 3 reactive patient\(s\) \(label 0\); need at least 5 per class"):
        patient_folds([1] * 10 + [0] * 3, 5)
    with pytest.raises(LeukolabError, match="--folds 1 must be at least 2"):
        patient_folds([1, 0, 1, 0], 1)


def test_patient_split_is_stratified_and_disjoint() -> None:
    labels = np.array([1] * 35 + [0] * 15)
    train, val = patient_split(labels, 0.2, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 50
    assert (labels[val] == 0).sum() == 3


# ----------------------------------------------------------------------------------------------
# bags
# ----------------------------------------------------------------------------------------------


def test_collate_pads_with_a_mask() -> None:
    bags = [torch.randn(3, 4), torch.randn(5, 4)]
    ds = BagDataset(bags, np.zeros((2, 1)), [0, 1])
    batch = collate_bags([ds[0], ds[1]])
    assert batch["x"].shape == (2, 5, 4)
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert (batch["x"][0, 3:] == 0).all() and torch.equal(batch["x"][1], bags[1])
    assert batch["cells"][0].tolist() == [0, 1, 2, -1, -1]
    assert batch["label"].tolist() == [0, 1] and batch["clinical"].shape == (2, 1)


def test_bag_sampling_keeps_a_random_subset() -> None:
    bag = torch.arange(40, dtype=torch.float).reshape(20, 2)
    ds = BagDataset([bag], np.zeros((1, 0)), [1], sample=True, keep_fraction=0.5, min_cells=4, max_cells=8)
    torch.manual_seed(0)
    a, b = ds[0], ds[0]
    assert len(a["x"]) == 8 and torch.equal(a["x"], bag[a["cells"]])
    assert not torch.equal(a["cells"], b["cells"])  # a new subset on every access


def test_image_bags(cohort_dir: Path) -> None:
    cohort = read_cohort(cohort_dir)

    def to_tensor(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)

    ds = BagDataset([p.cells for p in cohort.patients], cohort.clinical(["age"]), cohort.labels(), transform=to_tensor)
    item = ds[0]
    assert item["x"].shape == (len(cohort.patients[0].cells), 3, 16, 16)
    assert torch.equal(item["x"][1], to_tensor(Image.open(cohort.patients[0].cells[1]).convert("RGB")))
