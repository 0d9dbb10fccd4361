"""Class balancing (``--balance``): equal-expectation sampling, augmented copies, the run's class counts."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from leukolab.cli.main import main
from leukolab.data.balance import (
    BALANCE_MODES,
    augment_copies,
    balanced_sampler,
    check_balance_mode,
    class_counts,
    read_copies,
)
from leukolab.errors import LeukolabError
from leukolab.training.loaders import build_loader


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- sampler
def test_balanced_sampler_draws_every_class_with_equal_expectation() -> None:
    targets = [0] * 1000 + [1] * 100 + [2] * 10  # 100:10:1
    draws = list(balanced_sampler(targets, 20_000, seed=0))
    assert len(draws) == 20_000
    per_class = np.bincount([targets[i] for i in draws], minlength=3)
    expected = 20_000 / 3
    chi2 = float(((per_class - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, per_class  # chi-square, 2 degrees of freedom, p = 0.001
    # within a class the images are drawn uniformly: all 10 images of the rarest class, each ~1/10 of its draws
    rare = Counter(i for i in draws if targets[i] == 2)
    assert set(rare) == set(range(1100, 1110))
    assert max(rare.values()) / min(rare.values()) < 1.5


def test_balanced_sampler_same_seed_same_draws_and_epochs_and_ranks_differ() -> None:
    targets = [0] * 50 + [1] * 5
    a, b = balanced_sampler(targets, 200, seed=3), balanced_sampler(targets, 200, seed=3)
    assert list(a) == list(b) and list(a) == list(a)
    assert list(a) != list(balanced_sampler(targets, 200, seed=4))
    first = list(a)
    a.set_epoch(1)  # type: ignore[attr-defined]
    assert list(a) != first
    # two torchrun ranks: each half of one global draw, together the same draw as a single process
    r0, r1 = (list(balanced_sampler(targets, 200, seed=3, num_replicas=2, rank=r)) for r in (0, 1))
    assert len(r0) == len(r1) == 100
    merged = [x for pair in zip(r0, r1, strict=True) for x in pair]
    assert merged == first


def test_build_loader_with_balance_targets_samples_max_of_data_and_min_samples() -> None:
    ds = TensorDataset(torch.zeros(30, 1), torch.tensor([0] * 27 + [1] * 3))
    targets = [0] * 27 + [1] * 3
    loader = build_loader(ds, 10, train=True, seed=0, balance_targets=targets)
    assert len(loader.sampler) == 30  # type: ignore[arg-type]
    loader = build_loader(ds, 10, train=True, seed=0, min_samples=400, balance_targets=targets)
    ys = torch.cat([y for _, y in loader])
    assert len(ys) == 400 and 150 < int(ys.sum()) < 250  # class 1: 10 % of the data, ~half of the draws
    with pytest.raises(LeukolabError, match="3 balance targets for 30 items"):
        build_loader(ds, 10, train=True, balance_targets=[0, 1, 0])


def test_unknown_mode_lists_the_modes() -> None:
    assert check_balance_mode("augment") == "augment"
    with pytest.raises(LeukolabError, match="'smote' is unknown; expected one of none, weights, oversample, augment"):
        check_balance_mode("smote")
    assert BALANCE_MODES == ("none", "weights", "oversample", "augment")


# --------------------------------------------------------------------------- augmented copies
@pytest.fixture()
def small_set(tmp_path: Path) -> tuple[Path, list[Path], list[str]]:
    """3 classes with 6, 2 and 1 random RGB images; class ``b`` holds non-square (20 x 14) images."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c, n, (w, h) in (("a", 6, (16, 16)), ("b", 2, (20, 14)), ("c", 1, (16, 16))):
        (data / c).mkdir(parents=True)
        for i in range(n):
            p = data / c / f"{c}{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            paths.append(p)
            labels.append(c)
    return data, paths, labels


def test_augment_copies_reach_the_majority_count_inside_out_dir_only(
    small_set: tuple[Path, list[Path], list[str]], tmp_path: Path
) -> None:
    data, paths, labels = small_set
    before = _tree(data)
    out = tmp_path / "run" / "balanced"
    new_paths, new_labels, counts = augment_copies(paths, labels, out, seed=0, progress=False)
    assert counts == {"a": 6, "b": 6, "c": 6} == class_counts(new_labels)
    assert new_paths[: len(paths)] == paths and new_labels[: len(labels)] == labels
    copies = list(zip(new_paths[len(paths):], new_labels[len(labels):], strict=True))
    assert len(copies) == 9 and all(p.is_file() and p.parent == out / lab for p, lab in copies)
    assert _tree(data) == before  # the user's data is only read
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"balanced"}
    assert read_copies(out) == ([p for p, _ in copies], [lab for _, lab in copies])
    sources = pd.read_csv(out / "copies.csv")["source"]
    for (p, _), src in zip(copies, sources, strict=True):
        with Image.open(p) as cp, Image.open(src) as orig:
            assert cp.size == orig.size and cp.mode == "RGB"
            assert not np.array_equal(np.asarray(cp), np.asarray(orig.convert("RGB")))
    # class c's single image is copied 5 times, each a different augmentation
    c_copies = [np.asarray(Image.open(p)) for p, lab in copies if lab == "c"]
    assert len({a.tobytes() for a in c_copies}) == 5
    # class b's two images are both used before either is used twice
    b_sources = [src for (_, lab), src in zip(copies, sources, strict=True) if lab == "b"]
    assert len(set(b_sources[:2])) == 2
    # same seed, same files; another seed, other files
    _, _, _ = augment_copies(paths, labels, tmp_path / "again", seed=0, progress=False)
    assert _tree(tmp_path / "again") == _tree(out)
    augment_copies(paths, labels, tmp_path / "other", seed=1, progress=False)
    assert _tree(tmp_path / "other") != _tree(out)
    with pytest.raises(LeukolabError, match="already exists and is not empty"):  # never overwritten
        augment_copies(paths, labels, out, seed=0, progress=False)


def test_augment_copies_refuses_a_class_with_zero_images(
    small_set: tuple[Path, list[Path], list[str]], tmp_path: Path
) -> None:
    _, paths, labels = small_set
    out = tmp_path / "balanced"
    with pytest.raises(LeukolabError, match=r"^class 'd' has no training images; --balance augment"):
        augment_copies(paths, labels, out, seed=0, class_names=["a", "b", "c", "d"], progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------- a training run
@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 32 px WBCs: 3 classes with 16, 16 and 4 images."""
    from leukolab.data.synthetic import make_wbc_dataset

    src = make_wbc_dataset(tmp_path_factory.mktemp("imb") / "src", 16, size=32, seed=0, difficulty=0.0,
                           classes=("basophil", "lymphocyte", "neutrophil"), progress=False)
    data = tmp_path_factory.mktemp("imb") / "data"
    shutil.copytree(src, data, ignore=shutil.ignore_patterns("masks", "metadata.csv"))
    for p in sorted((data / "basophil").glob("*.png"))[4:]:
        p.unlink()
    return data


def _counts(run: Path) -> dict[str, object]:
    return json.loads((run / "class_counts.json").read_text())


@pytest.mark.parametrize("mode", ["oversample", "augment"])
def test_tiny_training_run_records_the_class_counts_it_trained_on(
    mode: str, imbalanced: Path, tmp_path: Path, tiny_overrides: Callable[..., dict[str, object]]
) -> None:
    from leukolab.pipelines.classify import train_classifier

    torch.set_num_threads(1)
    before = _tree(imbalanced)
    run = train_classifier(tmp_path, overrides=tiny_overrides(
        imbalanced, **{"train.epochs": 1, "data.balance": mode, "data.val_fraction": 0.25, "data.test_fraction": 0.0,
                       "data.batch_size": 8}))
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    info = _counts(run)
    assert info["balance"] == mode and info["images"] == {"basophil": 3, "lymphocyte": 12, "neutrophil": 12}
    draws = info["expected_draws_per_epoch"]
    assert isinstance(draws, dict) and len(set(draws.values())) == 1  # every class equally often
    if mode == "augment":
        assert info["trained_on"] == {"basophil": 12, "lymphocyte": 12, "neutrophil": 12}
        assert len(list((run / "balanced" / "basophil").glob("*.png"))) == 9
        assert not list((run / "balanced" / "lymphocyte").glob("*.png"))  # the majority class gets no copies
        assert info["samples_per_epoch"] == 36
    else:
        assert info["trained_on"] == info["images"] and not (run / "balanced").exists()
        assert info["samples_per_epoch"] == 27
    assert (run / "class_counts.csv").is_file()
    assert _tree(imbalanced) == before  # nothing written into the data


def test_class_weights_is_an_alias_of_balance_weights(
    imbalanced: Path, tmp_path: Path, tiny_overrides: Callable[..., dict[str, object]]
) -> None:
    from leukolab.pipelines.classify import train_classifier

    torch.set_num_threads(1)
    run = train_classifier(tmp_path, overrides=tiny_overrides(
        imbalanced, **{"train.epochs": 1, "optim.class_weights": True, "data.test_fraction": 0.0}))
    info = _counts(run)
    weights = info["loss_weights"]
    assert info["balance"] == "weights" and isinstance(weights, dict)
    assert weights["basophil"] > 3 * weights["lymphocyte"]
    with pytest.raises(LeukolabError, match="corrects the class imbalance twice"):
        train_classifier(tmp_path / "x", overrides=tiny_overrides(
            imbalanced, **{"optim.class_weights": True, "data.balance": "oversample"}))
    assert not (tmp_path / "x").exists()


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    return code, lines[-1] if lines else ""


def test_cli_bad_balance_inputs_exit_2_with_one_line(
    imbalanced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = ["--img-size", "32", "--epochs", "1", "--backbone", "resnet10t", "--out", str(tmp_path / "runs")]
    code, line = _cli_error(["train", str(imbalanced), "--balance", "smote", *fast], capsys)
    assert code == 2 and line == ("error: balance mode 'smote' is unknown; expected one of none, weights, "
                                  "oversample, augment")
    # a CSV whose train split has no basophil (all of them in val)
    rows = [(str(p), p.parent.name, "val" if p.parent.name == "basophil" else "train")
            for p in sorted(imbalanced.rglob("*.png"))]
    csv = tmp_path / "split.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(csv, index=False)
    code, line = _cli_error(["train", str(csv), "--balance", "augment", *fast], capsys)
    assert code == 2 and line.startswith("error: class 'basophil' has no training images; --balance augment")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_oversample_loader_of_a_run_draws_the_rare_class_as_often_as_the_others(imbalanced: Path) -> None:
    from leukolab.data.balance import BalancedSampler
    from leukolab.data.readers import read_labelled
    from leukolab.pipelines.classify import make_loader

    data = read_labelled(imbalanced)["all"]
    loader = make_loader(data, data.class_names, 32, 4, train=True, augment=False, seed=0, min_samples=3000,
                         balance=True)
    assert isinstance(loader.sampler, BalancedSampler) and len(loader.sampler) == 3000
    drawn = Counter(data.labels[i] for i in loader.sampler)
    assert data.labels.count("basophil") == 4 and all(900 < n < 1100 for n in drawn.values()), drawn
