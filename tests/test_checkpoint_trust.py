"""One trust policy: a checkpoint whose unpickling would run code is refused by every entry point.

The file below holds an object whose ``__reduce__`` writes a marker file when
unpickled. ``torch.load(weights_only=False)`` would run it (shown first, as a
control); every command that reads a checkpoint must stop with a one-line
``error:`` and exit status 2 instead, before anything runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from leukolab.checkpoints import load_checkpoint, save_checkpoint
from leukolab.cli.main import main
from leukolab.errors import LeukolabError


class RunsCode:
    """Unpickling this calls ``exec`` on code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like leukolab's (a ``backbone`` of tensors) but carries :class:`RunsCode`."""
    torch.save({"backbone": {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, "args": RunsCode(marker)}, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture()
def hostile(tmp_path: Path, marker: Path) -> Path:
    return hostile_checkpoint(tmp_path / "hostile.pt", marker)


def test_the_hostile_file_really_runs_code(hostile: Path, marker: Path) -> None:
    """The control: an unguarded ``torch.load`` executes the payload."""
    torch.load(hostile, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_it_and_opts_in_only_explicitly(hostile: Path, marker: Path) -> None:
    with pytest.raises(LeukolabError, match=r"holds pickled Python objects.*--allow-pickle"):
        load_checkpoint(hostile)
    assert not marker.exists()
    load_checkpoint(hostile, allow_pickle=True)
    assert marker.exists()


def test_save_checkpoint_refuses_python_objects(tmp_path: Path, marker: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\['args'\] is a .*RunsCode"):
        save_checkpoint({"args": RunsCode(marker)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def _refused(argv: list[str], marker: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{argv[0]}: exit {code}, stderr {err!r}"
    assert err.startswith("error: ") and "\n" not in err, err
    assert "pickled Python objects" in err and "--allow-pickle" in err, err
    assert not marker.exists(), f"{argv[0]} ran code from the checkpoint"
    return err


def _one_image(data: Path) -> Path:
    return next(p for p in sorted(data.rglob("*.png")))


def test_train_init_refuses(hostile: Path, marker: Path, wbc_small: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    _refused(["train", str(wbc_small), "--init", str(hostile), "--out", str(out), "--epochs", "1"], marker, capsys)
    assert not out.exists() or not any(out.iterdir())


def test_embed_refuses(hostile: Path, marker: Path, wbc_small: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["embed", str(hostile), str(wbc_small), "--out", str(tmp_path / "f.npz")], marker, capsys)
    assert not (tmp_path / "f.npz").exists()


def test_viz_attention_refuses(hostile: Path, marker: Path, wbc_small: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["viz", "attention", str(hostile), str(_one_image(wbc_small)), "--out", str(tmp_path / "att")],
             marker, capsys)


def test_convert_refuses(hostile: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["convert", str(hostile), "--out", str(tmp_path / "c.pt")], marker, capsys)
    assert not (tmp_path / "c.pt").exists()


def _run_with(tiny_run: Path, tmp_path: Path, name: str, hostile: Path) -> Path:
    """A copy of a finished run whose ``name`` checkpoint is the hostile file."""
    run = tmp_path / "shared-run"
    shutil.copytree(tiny_run, run)
    shutil.copyfile(hostile, run / name)
    return run


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_a_hostile_best_pt(command: str, hostile: Path, marker: Path, tiny_run: Path,
                                                       wbc_small: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_with(tiny_run, tmp_path, "best.pt", hostile)
    argv = [command, str(run)] + ([str(_one_image(wbc_small))] if command == "predict" else [])
    _refused(argv, marker, capsys)


def test_train_resume_refuses_a_hostile_last_pt(hostile: Path, marker: Path, tiny_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_with(tiny_run, tmp_path, "last.pt", hostile)
    _refused(["train", "--resume", str(run)], marker, capsys)


def test_a_trusted_pickled_init_loads_only_with_allow_pickle(tmp_path: Path) -> None:
    """Foreign files that pickle harmless objects (an argparse Namespace) are read once the user opts in."""
    import argparse

    from leukolab.models.backbones import create_backbone
    from leukolab.models.weights import load_backbone_weights

    source = create_backbone("resnet10t", 32)
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "args": argparse.Namespace(lr=0.1)}, path)
    target = create_backbone("resnet10t", 32)
    with pytest.raises(LeukolabError, match="pickled Python objects"):
        load_backbone_weights(target, path)
    report = load_backbone_weights(target, path, allow_pickle=True)
    assert set(report["loaded"]) == set(source.state_dict())
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
