"""Checkpoints on disk: epoch snapshots share last.pt's bytes, and a full disk is a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from leukolab.checkpoints import load_checkpoint, save_checkpoint
from leukolab.errors import LeukolabError
from leukolab.models.classifier import build_classifier
from leukolab.objectives.classification import ClassificationObjective
from leukolab.training.loop import Trainer, TrainerConfig
from leukolab.utils.files import link_or_copy


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def test_epoch_snapshots_are_last_pt_without_a_second_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier({"backbone": "resnet10t", "head": "linear", "drop_path": 0.0}, 32, 3)
    objective = ClassificationObjective(model, ["a", "b", "c"])
    Trainer(objective, TrainerConfig(epochs=3, progress=False, device="cpu", keep_last=2), tmp_path).fit(
        _batches(2, 0), None)
    snapshots = sorted((tmp_path / "checkpoints").glob("epoch_*.pt"))
    assert [p.name for p in snapshots] == ["epoch_0002.pt", "epoch_0003.pt"]
    assert os.path.samefile(snapshots[-1], tmp_path / "last.pt")  # one file on disk, two names
    # replacing last.pt at epoch 3 left epoch 2's snapshot as it was
    older, last = load_checkpoint(snapshots[0]), load_checkpoint(tmp_path / "last.pt")
    assert older["epoch"] == 2 and last["epoch"] == 3
    assert not all(torch.equal(older["backbone"][k], last["backbone"][k]) for k in last["backbone"])


def test_link_or_copy_falls_back_to_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"weights")

    def no_links(*args: object) -> None:
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    dst = link_or_copy(src, tmp_path / "sub" / "b.bin")
    assert dst.read_bytes() == b"weights" and not os.path.samefile(src, dst)


def test_a_failed_torch_write_is_a_one_line_error_that_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, target)

    def full_disk(obj: object, f: object) -> None:
        Path(f).write_bytes(b"half")  # type: ignore[arg-type]
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore torch detail")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LeukolabError) as info:
        save_checkpoint({"epoch": 2}, target)
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    assert "torch.save failed: [enforce fail" in message and "MiB free on that disk" in message
    assert load_checkpoint(target)["epoch"] == 1  # the earlier checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
