"""Ensemble presets: ``leukolab train DATA --preset P`` trains one run per member and writes an ensemble folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from leukolab.cli.main import main
from leukolab.config import ensemble_preset, resolve

torch.set_num_threads(1)

PRESET = """# two members: the preset as is, and one with another learning rate and input size
model: {backbone: resnet10t}
data: {img_size: 32, batch_size: 16}
train: {epochs: 1, keep_last: 0, progress: false}
optim: {warmup_epochs: 0}
ensemble:
  members:
    - {}
    - {optim: {lr: 3.0e-3}, data: {img_size: 40}}
  weights: equal
  tta: true
"""


def test_ensemble_preset_members_merge_over_the_preset(tmp_path: Path) -> None:
    preset = tmp_path / "ens.yaml"
    preset.write_text(PRESET)
    first = resolve("train", None, {"preset": str(preset)})
    second = resolve("train", None, {"preset": str(preset), "preset_member": 1})
    assert (first["preset_member"], first["optim"]["lr"], first["data"]["img_size"]) == (0, 1e-3, 32)
    assert (second["preset_member"], second["optim"]["lr"], second["data"]["img_size"]) == (1, 3e-3, 40)
    assert resolve("train", None, {"preset": str(preset), "preset_member": 1, "data.img_size": 48})["data"][
        "img_size"] == 48  # command-line options still win
    assert ensemble_preset(preset) == {"members": [{}, {"optim": {"lr": 3e-3}, "data": {"img_size": 40}}],
                                       "weights": "equal", "tta": True}


def test_ensemble_preset_trains_each_member_and_writes_an_ensemble_evaluate_takes(
    wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preset = tmp_path / "ens.yaml"
    preset.write_text(PRESET)
    out = tmp_path / "runs"
    code = main(["train", str(wbc_small), "--preset", str(preset), "--out", str(out), "--seed", "0", "--name", "e"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    members = [p for p in folders if p.name.startswith("e-m")]
    (ens,) = [p for p in folders if p.name.startswith("e-ensemble")]
    assert len(members) == 2 and "ensemble folder:" in captured.out
    configs = [yaml.safe_load((m / "config.yaml").read_text()) for m in members]
    assert [c["preset_member"] for c in configs] == [0, 1]
    assert [c["data"]["img_size"] for c in configs] == [32, 40]
    spec = yaml.safe_load((ens / "ensemble.yaml").read_text())
    assert spec["weights"] == [0.5, 0.5] and spec["tta"] is True and spec["objective"] == "equal"
    assert [Path(m).name for m in spec["members"]] == [m.name for m in members]
    # evaluate takes the folder like a run (the members' shared test split, TTA as the preset says), and its
    # probabilities are the mean of the members' own
    assert main(["evaluate", str(ens), "--no-progress"]) == 0
    for m in members:
        assert main(["evaluate", str(m), "--tta", "--no-progress"]) == 0
    capsys.readouterr()
    probs = [pd.read_csv(f / "eval" / "predictions.csv").sort_values("path") for f in (ens, *members)]
    cols = [c for c in probs[0].columns if c.startswith("prob_")]
    np.testing.assert_allclose(probs[0][cols].to_numpy(), (probs[1][cols].to_numpy() + probs[2][cols].to_numpy()) / 2,
                               atol=1e-5)


@pytest.mark.parametrize(("ensemble", "message"), [
    ("{members: [{}], weights: equal}", "at least 2 mappings"),
    ("{members: [{}, {}], weights: mean}", "weights 'mean'"),
    ("{members: [{}, {}], tta: maybe}", "tta 'maybe'"),
    ("{members: [{}, {nope: 1}]}", "unknown config key 'nope'"),
    ("{members: [{}, {}], vote: hard}", "unknown key 'vote'"),
])
def test_bad_ensemble_presets_are_one_line_errors(wbc_small: Path, tmp_path: Path, ensemble: str, message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text(f"train: {{epochs: 1}}\nensemble: {ensemble}\n")
    code = main(["train", str(wbc_small), "--preset", str(preset), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
