"""``leukolab pretrain``: runs end to end, checkpoints load into timm / classifiers, bad input exits 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

import leukolab.cli.pretrain  # noqa: F401 - registers the command
from leukolab.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
from leukolab.cli.main import main
from leukolab.data.synthetic import make_pool
from leukolab.models.backbones import create_backbone
from leukolab.models.weights import checkpoint_backbone_spec, load_backbone_weights
from leukolab.pipelines.pretrain import collect_images, split_pool

TINY_CONFIG = {
    "model": {"backbone_kwargs": {"patch_size": 8, "depth": 2}},
    "data": {"img_size": 32, "batch_size": 8, "val_fraction": 0.2},
    "dino": {"local_size": 16, "local_crops": 2, "out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
    "train": {"progress": False},
    "optim": {"base_lr": 0.01},
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pool(tmp_path_factory.mktemp("pt") / "pool", 24, size=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()


def _run_dir(out: str) -> Path:
    return Path(out.strip().splitlines()[-1].removeprefix("run folder: "))


def _check_backbone_roundtrip(run: Path, registers: int) -> dict:
    spec = checkpoint_backbone_spec(run)
    kwargs = {"patch_size": 8, "depth": 2, "reg_tokens": registers}
    assert (spec.name, spec.img_size, spec.patch_size, spec.kwargs) == ("vit_tiny_patch16_224", 32, 8, kwargs)
    model = create_backbone(spec.name, spec.img_size, **spec.kwargs)
    report = load_backbone_weights(model, run)
    assert set(report["loaded"]) == set(model.state_dict()) and not report["ignored"]
    ckpt = load_checkpoint(run / "best.pt")  # plain data: weights_only=True
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["backbone_spec"]["kwargs"] == kwargs
    timm.create_model(spec.name, pretrained=False, num_classes=0, img_size=32, **spec.kwargs).load_state_dict(
        ckpt["backbone"])
    assert torch.equal(model.state_dict()["reg_token"], ckpt["backbone"]["reg_token"])
    assert ckpt["registers"] == registers
    return ckpt


@pytest.mark.slow
def test_mae_run_checkpoint_and_resume(pool: Path, tiny_yaml: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["pretrain", str(pool), "--method", "mae", "--config", str(tiny_yaml), "--epochs", "2",
                              "--registers", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    run = _run_dir(out)
    for name in ("config.yaml", "splits.csv", "history.csv", "curves.png", "best.pt", "last.pt",
                 "reconstructions.png"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["val_loss"].notna().all()
    splits = pd.read_csv(run / "splits.csv")
    assert (splits["split"] == "val").sum() == round(24 * 0.2)
    ckpt = _check_backbone_roundtrip(run, registers=2)
    assert ckpt["task"] == "pretrain-mae" and ckpt["lr"] == pytest.approx(0.01 * 8 / 256)

    # a different option is refused on resume; the same config continues an interrupted run
    code, _, err = run_cli(["pretrain", "--resume", str(run), "--mask-ratio", "0.5"], capsys)
    assert code == 2 and "different config" in err and "mae.mask_ratio=0.5" in err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["epochs"] = 3  # as if a 3-epoch run had been interrupted after epoch 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, _, err = run_cli(["pretrain", "--resume", str(run), "--method", "mae"], capsys)
    assert code == 0, err
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_dino_run_exports_the_teacher(pool: Path, tiny_yaml: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["pretrain", str(pool), "--method", "dino", "--config", str(tiny_yaml), "--epochs", "1",
                              "--registers", "1", "--out", str(tmp_path), "--keep-last", "0"], capsys)
    assert code == 0, err
    run = _run_dir(out)
    history = pd.read_csv(run / "history.csv")
    assert {"train_loss", "val_loss", "val_teacher_entropy"} <= set(history.columns)
    ckpt = _check_backbone_roundtrip(run, registers=1)
    assert ckpt["task"] == "pretrain-dino"
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in ckpt["objective"].items()
               if k.startswith("teacher.backbone.")}
    assert all(torch.equal(teacher[k], v) for k, v in ckpt["backbone"].items())


def test_folders_are_read_recursively_and_ignore_fraction_is_deterministic(pool: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b" / "deep" / "er"
    shutil.copytree(pool, a)
    b.mkdir(parents=True)
    for i, src in enumerate(sorted(pool.glob("*.png"))[:10]):
        Image.open(src).convert("RGB").save(b / f"img_{i}.jpg")
    used, ignored = collect_images([a, tmp_path / "b", a], ignore_fraction=0.25)
    assert len(used) + len(ignored) == 34 and len(ignored) == round(24 * 0.25) + round(10 * 0.25)
    assert collect_images([a, tmp_path / "b"], ignore_fraction=0.25) == (used, ignored)
    train, val = split_pool(used, 0.1, seed=0)
    assert len(val) == round(len(used) * 0.1) and not set(train) & set(val)
    assert split_pool(used, 0.1, seed=0) == (train, val) and split_pool(used, 0.1, seed=1) != (train, val)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/no/such/folder"], "/no/such/folder does not exist"),
        (["{empty}"], "no images found"),
        (["{pool}", "--mask-ratio", "0"], "mask ratio 0.0 is outside (0, 1)"),
        (["{pool}", "--mask-ratio", "1.2"], "mask ratio 1.2 is outside (0, 1)"),
        (["{pool}", "--method", "dino", "--backbone", "resnet18", "--registers", "4"],
         "backbone resnet18 cannot take register tokens"),
        (["{pool}", "--method", "mae", "--backbone", "resnet18"], "needs a timm Vision Transformer"),
        (["{pool}", "--method", "simclr"], "unknown method 'simclr'"),
        (["{pool}", "--ignore-fraction", "1"], "ignore fraction 1.0 is outside [0, 1)"),
        (["{pool}", "--backbone", "vit_tinny_patch16"], "unknown backbone 'vit_tinny_patch16'"),
        ([], "no DATA given"),
        (["{pool}", "--resume", "{empty}"], "has no config.yaml"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(
    args: list[str], expected: str, pool: Path, tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    args = [a.replace("{pool}", str(pool)).replace("{empty}", str(empty)) for a in args]
    config = ["--config", str(tiny_yaml)] if args and "resnet18" not in args else []
    code, _, err = run_cli(["pretrain", *args, *config, "--out", str(tmp_path / "runs"), "--epochs", "1"], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert expected in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_corrupt_images_are_listed_before_training(pool: Path, tiny_yaml: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(pool, data)
    (data / "broken.png").write_bytes(b"not a png")
    code, _, err = run_cli(["pretrain", str(data), "--config", str(tiny_yaml), "--out", str(tmp_path / "runs")],
                           capsys)
    assert code == 2 and "1 unreadable image(s)" in err and "broken.png" in err
    assert not (tmp_path / "runs").exists()
