"""Training ingredients of ``leukolab train``: MixUp / CutMix, the background class, presets and folds files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.nn import functional as F

from leukolab.checkpoints import load_checkpoint
from leukolab.cli.main import main
from leukolab.config import load_preset, preset_names, resolve
from leukolab.data.mixing import BatchMixer, MixConfig
from leukolab.data.preprocess import check_image_options
from leukolab.data.readers import read_image_folder
from leukolab.errors import LeukolabError
from leukolab.objectives.classification import ClassificationObjective
from leukolab.pipelines import classify
from leukolab.pipelines.classify import make_splits, train_classifier

# fast CLI training: one epoch of resnet10t at 32 px, no progress bars
FAST = ["--img-size", "32", "--epochs", "1", "--backbone", "resnet10t", "--batch-size", "16"]
QUIET = {"train.progress": False, "train.keep_last": 0}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and the ``error:`` line (or all of stderr)."""
    code = main(args)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return code, errors[-1] if len(errors) == 1 else "\n".join(lines)


def expect_error(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1 and expected in err, err


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def data_cfg(path: Path, **extra: object) -> dict[str, object]:
    return {"path": str(path), "val_fraction": 0.2, "test_fraction": 0.2, "label_fraction": 1.0, **extra}


@pytest.fixture(scope="module")
def background_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 noise crops, some in a subfolder (read recursively)."""
    root = tmp_path_factory.mktemp("bg") / "background_crops"
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / ("field_a" if i < 5 else "field_b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"bg_{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ MixUp / CutMix
def smoothed_one_hot(y: torch.Tensor, classes: int, eps: float) -> torch.Tensor:
    return F.one_hot(y, classes).float() * (1 - eps) + eps / classes


def test_mixup_mixes_images_and_targets_with_one_coefficient_and_smooths_once() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 6, 6), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    np.random.seed(3)
    mixed, soft = BatchMixer(MixConfig(mixup=1.0), 5, label_smoothing=0.1)(x.clone(), y)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8))
    # each image is lam * itself + (1 - lam) * its mirror in the batch; recover lam from the pixels
    a, b = (x - x.flip(0)).flatten(), (mixed - x.flip(0)).flatten()
    lam = float((a @ b) / (a @ a))
    assert 0.0 < lam < 1.0 and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    one = smoothed_one_hot(y, 5, 0.1)  # smoothing once, before mixing
    assert torch.allclose(soft, lam * one + (1 - lam) * one.flip(0), atol=1e-5)


def test_an_odd_batch_mixes_all_but_its_last_image() -> None:
    torch.manual_seed(1)
    x, y = torch.rand(7, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 1])
    np.random.seed(0)
    mixed, soft = BatchMixer(MixConfig(cutmix=1.0), 3)(x.clone(), y)
    assert mixed.shape == x.shape and soft.shape == (7, 3) and torch.allclose(soft.sum(1), torch.ones(7))
    assert torch.equal(mixed[6], x[6]) and torch.equal(soft[6], torch.tensor([0.0, 1.0, 0.0]))
    assert not torch.equal(mixed[:6], x[:6])  # CutMix pasted a box into the first six


def test_training_loss_is_the_soft_target_cross_entropy_and_acc_uses_the_soft_targets_argmax() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    weights = torch.tensor([0.5, 1.0, 1.5, 1.0])
    objective = ClassificationObjective(model, ["a", "b", "c", "d"], class_weights=weights, label_smoothing=0.1,
                                        mix=MixConfig(mixup=0.4, cutmix=1.0))
    x, y = torch.rand(10, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    for seed in range(4):  # MixUp and CutMix batches
        np.random.seed(seed)
        out = objective.training_step((x.clone(), y))
        np.random.seed(seed)
        mixed, soft = BatchMixer(MixConfig(mixup=0.4, cutmix=1.0), 4, label_smoothing=0.1)(x.clone(), y)
        logits = model(mixed)
        expected = -(weights * soft * torch.log_softmax(logits, 1)).sum(1).mean()
        assert torch.allclose(out.loss, expected, atol=1e-6)
        assert out.logs["acc"] == pytest.approx((logits.argmax(1) == soft.argmax(1)).float().mean().item())
    # without mix: the hard-label loss is untouched
    plain = ClassificationObjective(model, ["a", "b", "c", "d"], label_smoothing=0.1)
    assert plain.batch_transform is None
    assert torch.allclose(plain.training_step((x, y)).loss, F.cross_entropy(model(x), y, label_smoothing=0.1))


# ------------------------------------------------------------------------------------------------ background class
def test_background_is_split_like_a_class_and_leaves_the_other_splits_alone(
    wbc_small: Path, background_dir: Path
) -> None:
    plain = make_splits(data_cfg(wbc_small), seed=0)
    with_bg = make_splits(data_cfg(wbc_small, background=str(background_dir)), seed=0)
    assert with_bg.class_names == ["background", *plain.class_names]
    for name in ("train", "val", "test"):
        a, b = getattr(plain, name), getattr(with_bg, name)
        rows = [(p, lab) for p, lab in zip(b.paths, b.labels, strict=True) if lab != "background"]
        assert rows == list(zip(a.paths, a.labels, strict=True))  # the cell classes keep their split
        assert b.labels.count("background") >= 2  # 10 crops: 6 / 2 / 2
    n_bg = sum(getattr(with_bg, s).labels.count("background") for s in ("train", "val", "test"))
    assert n_bg == 10


def test_a_background_folder_inside_data_is_a_class_and_is_not_added_twice(
    wbc_small: Path, background_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for c in ("lymphocyte", "neutrophil"):
        (data / c).symlink_to(wbc_small / c, target_is_directory=True)
    (data / "background").symlink_to(background_dir, target_is_directory=True)
    splits = make_splits(data_cfg(data), seed=0)
    assert splits.class_names == ["background", "lymphocyte", "neutrophil"]
    again = make_splits(data_cfg(data, background=str(data / "background")), seed=0)
    total = sum(getattr(again, s).labels.count("background") for s in ("train", "val", "test"))
    assert total == 10


def test_bad_background_folders_exit_2(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    expect_error(["train", str(wbc_small), "--background", str(tmp_path / "nope"), "--out", str(out), *FAST],
                 "background folder", capsys)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    expect_error(["train", str(wbc_small), "--background", str(tmp_path / "empty"), "--out", str(out), *FAST],
                 "holds no images", capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ presets
def test_every_packaged_preset_is_a_valid_train_config() -> None:
    assert "pbc-best" in preset_names()
    for name in preset_names():
        cfg = resolve("train", None, {"preset": name})
        assert cfg["preset"] == name
        MixConfig.from_config(cfg["mix"])
        check_image_options(cfg["data"])  # crop / stain / mask options are valid values
        assert isinstance(classify.build_model(cfg, 5), nn.Module)
    best = resolve("train", None, {"preset": "pbc-best"})
    assert (best["model"]["backbone"], best["data"]["img_size"], best["train"]["epochs"]) == ("resnet18", 64, 15)
    assert (best["optim"]["lr"], best["mix"]["mixup"], best["mix"]["cutmix"]) == (1e-3, 0.0, 0.0)
    assert best["data"]["crop"] == "cell" and best["preset_member"] == 0
    from leukolab.config import ensemble_preset

    second = resolve("train", None, {"preset": "pbc-best", "preset_member": 1})  # the ensemble's second member
    assert (second["data"]["crop"], second["train"]["epochs"], second["model"]["backbone"]) == ("none", 6, "resnet18")
    assert ensemble_preset("pbc-best") == {"members": [{}, {"data": {"crop": "none"}, "train": {"epochs": 6}}],
                                           "weights": "equal", "tta": True}
    assert ensemble_preset("other-lab") is None
    other = resolve("train", None, {"preset": "other-lab"})["data"]
    assert (other["crop"], other["stain_norm"], other["mask_aug"]) == ("cell", "reinhard", 0.3)


def test_preset_config_and_options_merge_in_that_order(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("train: {epochs: 7}\noptim: {lr: 0.5, weight_decay: 0.3}\ndata: {batch_size: 8}\n")
    config = tmp_path / "config.yaml"
    config.write_text("optim: {lr: 0.25}\ndata: {batch_size: 12}\n")
    cfg = resolve("train", config, {"preset": str(preset), "data.batch_size": 16})
    assert (cfg["train"]["epochs"], cfg["optim"]["weight_decay"]) == (7, 0.3)  # from the preset
    assert cfg["optim"]["lr"] == 0.25 and cfg["data"]["batch_size"] == 16  # --config over it, options over both
    assert cfg["preset"] == str(preset.resolve())
    # a --config may name the preset itself; --preset wins over it
    config.write_text("preset: pbc-best\noptim: {lr: 0.25}\n")
    assert resolve("train", config, {})["model"]["backbone"] == "resnet18"
    assert resolve("train", config, {"preset": str(preset)})["train"]["epochs"] == 7


def test_a_preset_run_with_mixup_trains_records_both_and_resumes(
    wbc_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    preset = tmp_path / "fast.yaml"
    preset.write_text("model: {backbone: resnet10t}\ndata: {img_size: 32, batch_size: 16}\ntrain: {epochs: 1}\n"
                      "mix: {mixup: 0.2, switch_prob: 0.3}\n")
    monkeypatch.chdir(tmp_path)  # a relative preset path is recorded as an absolute one
    code, err = run_cli(["train", str(wbc_small), "--preset", "fast.yaml", "--out", "runs", "--keep-last", "0",
                         "--mixup", "0.4", "--cutmix", "1", "--mix-prob", "0.8"], capsys)
    assert code == 0, err
    run = only_run(tmp_path / "runs")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == str(preset.resolve()) and cfg["model"]["backbone"] == "resnet10t"
    assert cfg["mix"] == {"mixup": 0.4, "cutmix": 1.0, "prob": 0.8, "switch_prob": 0.3}  # options over the preset
    hist = pd.read_csv(run / "history.csv")
    assert np.isfinite(hist["train_loss"]).all() and "val_balanced_accuracy" in hist
    assert main(["train", "--resume", str(run), "--preset", "fast.yaml"]) == 0  # the same preset: accepted
    expect_error(["train", "--resume", str(run), "--preset", "pbc-best"], "different config", capsys)
    # a run written before these keys existed resumes too (they take their defaults)
    for key in ("background", "folds_file", "fold"):
        del cfg["data"][key]
    del cfg["mix"], cfg["preset"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert train_classifier(resume=run) == run


def test_bad_presets_exit_2(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    expect_error(["train", str(wbc_small), "--preset", "pbc-bestest", "--out", str(out)],
                 "one of: other-lab, pbc-best", capsys)
    expect_error(["train", str(wbc_small), "--preset", str(tmp_path / "no.yaml"), "--out", str(out)],
                 "does not exist", capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {learning_rate: 0.1}\n")
    expect_error(["train", str(wbc_small), "--preset", str(bad), "--out", str(out)], "'learning_rate'", capsys)
    bad.write_text("preset: pbc-best\n")
    with pytest.raises(LeukolabError, match="do not nest"):
        load_preset(str(bad))
    expect_error(["train", str(wbc_small), "--mixup", "-1", "--out", str(out)], "mix.mixup -1.0 is negative", capsys)
    expect_error(["train", str(wbc_small), "--mix-prob", "1.5", "--out", str(out)], "mix.prob 1.5", capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ folds files
def write_folds(wbc_small: Path, csv_path: Path, n_folds: int = 3, test_share: bool = False) -> pd.DataFrame:
    """Every image of ``wbc_small`` with fold ``i % n_folds`` (per class), paths relative to the CSV."""
    data = read_image_folder(wbc_small)
    rows = []
    for label in data.class_names:
        paths = [p for p, lab in zip(data.paths, data.labels, strict=True) if lab == label]
        for i, p in enumerate(paths):
            rows.append({"path": os.path.relpath(p, csv_path.parent), "label": label, "fold": i % n_folds,
                         "patient": f"p{i}"})
            if test_share:
                rows[-1]["split"] = "test" if i >= 27 else "train"
    table = pd.DataFrame(rows)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    return table


def test_the_chosen_fold_is_exactly_the_validation_split(wbc_small: Path, tmp_path: Path) -> None:
    table = write_folds(wbc_small, tmp_path / "cv" / "folds.csv")
    resolved = {os.path.normpath(tmp_path / "cv" / p): f for p, f in zip(table["path"], table["fold"], strict=True)}
    splits = make_splits(data_cfg(wbc_small, folds_file=str(tmp_path / "cv" / "folds.csv"), fold=1), seed=0)
    assert {resolved[os.path.normpath(p)] for p in splits.val.paths} == {1}
    assert {resolved[os.path.normpath(p)] for p in splits.train.paths} == {0, 2}
    assert len(splits.val) == 50 and len(splits.train) == 100 and len(splits.test) == 0
    # a split column: its test rows are the test split and in no fold
    write_folds(wbc_small, tmp_path / "t" / "folds.csv", test_share=True)
    with_test = make_splits(data_cfg(tmp_path / "t" / "folds.csv", folds_file=str(tmp_path / "t" / "folds.csv"),
                                     fold=0), seed=0)
    assert len(with_test.test) == 15 and len(with_test.val) + len(with_test.train) == 135


def test_a_fold_run_with_background_validates_on_that_fold(wbc_small: Path, background_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    table = write_folds(wbc_small, tmp_path / "folds.csv")
    code, err = run_cli(["train", "--folds-file", str(tmp_path / "folds.csv"), "--fold", "2", "--background",
                         str(background_dir), "--out", str(tmp_path / "runs"), *FAST, "--keep-last", "0"], capsys)
    assert code == 0, err
    run = only_run(tmp_path / "runs")
    assert run.name.startswith("resnet10t-f1-s0-fold2")
    splits = pd.read_csv(run / "splits.csv")
    cells = splits[splits["label"] != "background"]
    base = tmp_path.resolve()
    want = {os.path.normpath(base / p) for p, f in zip(table["path"], table["fold"], strict=True) if f == 2}
    assert {os.path.normpath(p) for p in cells.loc[cells["split"] == "val", "path"]} == want
    assert set(splits["split"]) == {"train", "val"}  # no test split without a split column
    bg = splits[splits["label"] == "background"]  # 10 crops dealt over 3 folds: fold 2 gets 3
    assert (bg["split"] == "val").sum() == 3 and (bg["split"] == "train").sum() == 7
    assert "background" in load_checkpoint(run / "best.pt")["class_names"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["background"] == str(background_dir.resolve())
    assert cfg["data"]["fold"] == 2 and cfg["data"]["folds_file"] == str((tmp_path / "folds.csv").resolve())


def test_bad_folds_inputs_exit_2(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "runs")
    folds = tmp_path / "folds.csv"
    table = write_folds(wbc_small, folds)
    expect_error(["train", "--folds-file", str(folds), "--fold", "3", "--out", out], "--fold 3 is out of range", capsys)
    expect_error(["train", "--folds-file", str(folds), "--fold", "-1", "--out", out], "folds 0..2", capsys)
    expect_error(["train", "--folds-file", str(folds), "--out", out], "needs --fold K", capsys)
    expect_error(["train", str(wbc_small), "--fold", "1", "--out", out], "needs --folds-file", capsys)
    expect_error(["train", "--folds-file", str(tmp_path / "none.csv"), "--fold", "0", "--out", out],
                 "does not exist", capsys)
    table.drop(columns="fold").to_csv(tmp_path / "nofold.csv", index=False)
    expect_error(["train", "--folds-file", str(tmp_path / "nofold.csv"), "--fold", "0", "--out", out],
                 "missing column(s) fold", capsys)
    moved = table.copy()
    moved.loc[3, "path"] = "gone/cell.png"
    moved.to_csv(tmp_path / "moved.csv", index=False)
    expect_error(["train", "--folds-file", str(tmp_path / "moved.csv"), "--fold", "0", "--out", out],
                 "gone/cell.png does not exist", capsys)
    table.assign(fold=table["fold"].astype(float) + 0.5).to_csv(tmp_path / "half.csv", index=False)
    expect_error(["train", "--folds-file", str(tmp_path / "half.csv"), "--fold", "0", "--out", out],
                 "is not an integer >= 0", capsys)
    other = tmp_path / "other"
    other.mkdir()
    expect_error(["train", str(other), "--folds-file", str(folds), "--fold", "0", "--out", out], "is not inside",
                 capsys)
    assert not Path(out).exists()
