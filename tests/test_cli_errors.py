"""Every bad input ends in a one-line error naming the value, exit status 2, nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leukolab.cli.main import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) <= 1
    # progress bars may precede it; the error itself is the last line, and only one
    return code, (lines[-1] if errors and lines[-1] == errors[0] else "\n".join(lines))


FAST = ["--img-size", "32", "--epochs", "1", "--backbone", "resnet10t"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("masks", "metadata.csv"))
    return dst


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "/no/such/folder"], "/no/such/folder does not exist"),
        (["train", "{data}", "--backbone", "vit_tinny_patch16"], "unknown backbone 'vit_tinny_patch16'"),
        (["train", "{data}", "--label-fraction", "0"], "label fraction 0.0 is outside (0, 1]"),
        (["train", "{data}", "--label-fraction", "1.5"], "label fraction 1.5 is outside (0, 1]"),
        (["train", "{data}", "--no-such-option"], "No such option"),
        (["train", "{data}", "--img-size", "60", "--backbone", "vit_tiny_patch16"], "not a multiple"),
        (["evaluate", "/no/run"], "no best.pt"),
        (["synth", "wbc", "{data}"], "exists"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(
    args: list[str], expected: str, wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("{data}", str(wbc_small)) for a in args]
    code, err = run_cli([*args, "--out", str(tmp_path)] if args[0] == "train" else args, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert expected in err


def test_data_problems(wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _copy(wbc_small, tmp_path / "d")
    empty_cls = data / "plasma_cell"
    empty_cls.mkdir()
    code, err = run_cli(["train", str(data), "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and "plasma_cell holds no images" in err
    empty_cls.rmdir()
    bad = data / "monocyte" / "broken.png"
    bad.write_bytes(b"not a png at all")
    code, err = run_cli(["train", str(data), "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and "unreadable image" in err and "broken.png" in err
    single = tmp_path / "single"
    shutil.copytree(wbc_small / "lymphocyte", single / "lymphocyte")
    code, err = run_cli(["train", str(single), "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and "expected at least 2" in err


def test_init_with_wrong_shapes_is_refused(
    tiny_run: Path, wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(
        ["train", str(wbc_small), "--out", str(tmp_path), "--init", str(tiny_run / "best.pt"),
         "--img-size", "32", "--backbone", "resnet18", "--epochs", "1"],
        capsys,
    )
    assert code == 2 and "best.pt" in err and "expected a checkpoint of the same architecture" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_init_from_a_run_loads_every_backbone_key(tiny_run: Path) -> None:
    from leukolab.models.backbones import create_backbone
    from leukolab.models.weights import load_backbone_weights

    model = create_backbone("resnet10t", 32)
    report = load_backbone_weights(model, tiny_run)
    assert set(report["loaded"]) == set(model.state_dict())
    ckpt = torch.load(tiny_run / "best.pt", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["backbone"][k])


def test_resume_with_a_different_config_is_refused(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (tiny_run / "history.csv").read_text()
    code, err = run_cli(["train", "--resume", str(tiny_run), "--lr", "0.5"], capsys)
    assert code == 2 and "optim.lr=0.5" in err
    assert (tiny_run / "history.csv").read_text() == before


def test_entry_point_runs_as_a_program(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "leukolab.cli.main", "train", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
