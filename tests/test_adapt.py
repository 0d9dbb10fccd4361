"""AdaBN: ``adapt_batchnorm`` recomputes BatchNorm statistics; ``leukolab adapt`` writes an adapted run folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from leukolab.cli.main import main
from leukolab.models.bn_adapt import adapt_batchnorm, batchnorm_layers


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


def test_adapt_batchnorm_gives_the_average_batch_statistics_and_changes_nothing_else() -> None:
    net = _net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(5, 3, 8, 8) * 3 + 2, torch.randn(7, 3, 8, 8) * 0.5 - 1]
    assert adapt_batchnorm(net, batches) == 12
    # reference: each batch's mean / unbiased variance of the first BN layer's input, averaged over batches
    with torch.no_grad():
        inputs = [net[0](b) for b in batches]
    means = torch.stack([z.mean((0, 2, 3)) for z in inputs]).mean(0)
    vars_ = torch.stack([z.transpose(0, 1).flatten(1).var(1, unbiased=True) for z in inputs]).mean(0)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, vars_, atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.3 and net[5].momentum == 0.1  # restored
    assert not net.training and not any(m.training for m in net.modules())
    after = net.state_dict()
    for k, v in before.items():
        if "running" in k or "num_batches" in k:
            continue
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)  # no weight changes
    # dropout stayed off while adapting: the same data give the same statistics twice
    again = _net().eval()
    adapt_batchnorm(again, batches)
    torch.testing.assert_close(again[5].running_mean, net[5].running_mean, atol=0, rtol=0)


def test_adapt_batchnorm_refuses_a_network_without_batchnorm_and_no_images() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="no images"):
        adapt_batchnorm(_net(), [])
    assert len(batchnorm_layers(_net())) == 2


def _shifted(src: Path, dst: Path) -> Path:
    """The class folders of ``src`` recoloured as another lab's stain and camera might (no labels needed)."""
    for p in sorted(src.rglob("*.png")):
        rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        out = np.clip(rgb * np.array([0.55, 0.75, 1.1]) + np.array([10.0, -5.0, 25.0]), 0, 255).astype(np.uint8)
        target = dst / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(target)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bal_acc(folder: Path) -> float:
    return float(yaml.safe_load((folder / "eval" / "metrics.json").read_text())["balanced_accuracy"])


def test_adapt_cli_writes_a_new_run_that_evaluate_takes(tiny_run: Path, wbc_small: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from leukolab.pipelines.predictors import load_predictor

    shifted = _shifted(wbc_small / "test" if (wbc_small / "test").is_dir() else wbc_small, tmp_path / "lab2")
    source_sha = _sha(tiny_run / "best.pt")
    new = tmp_path / "adapted"
    code = main(["adapt", str(tiny_run), str(shifted), "--out", str(new), "--no-progress", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "adapted the BatchNorm statistics" in out
    assert _sha(tiny_run / "best.pt") == source_sha  # the source run is untouched
    cfg = yaml.safe_load((new / "config.yaml").read_text())
    n = len(list(shifted.rglob("*.png")))
    assert cfg["adapt"]["method"] == "batchnorm" and cfg["adapt"]["images"] == n
    assert (new / "splits.csv").is_file() and len((new / "adapt_images.csv").read_text().splitlines()) == n + 1
    # the stored statistics are the shifted images' batch statistics, fed as evaluate feeds them
    adapted = load_predictor(new, device="cpu")
    source = load_predictor(tiny_run, device="cpu")
    order = [Path(p) for p in (new / "adapt_images.csv").read_text().splitlines()[1:]]
    images = [Image.open(p).convert("RGB") for p in order]
    adapt_batchnorm(source.model, [source.tensors(images[i:i + 16]) for i in range(0, len(images), 16)])
    for a, b in zip(batchnorm_layers(adapted.model), batchnorm_layers(source.model), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.running_var, b.running_var, atol=1e-5, rtol=1e-4)
    # evaluate takes it like any run; on the shifted images it beats the source run clearly
    assert main(["evaluate", str(new), "--data", str(shifted), "--no-progress"]) == 0
    assert main(["evaluate", str(tiny_run), "--data", str(shifted), "--no-progress"]) == 0
    capsys.readouterr()
    assert _bal_acc(new) >= _bal_acc(tiny_run) + 0.15  # measured: 0.73 against 0.40
    # never overwritten
    assert main(["adapt", str(tiny_run), str(shifted), "--out", str(new), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_adapt_bad_input_is_one_line_and_exit_2(tiny_run: Path, wbc_small: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(wbc_small.rglob("*.png"))[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.yaml").write_text(yaml.safe_dump({"members": [str(tiny_run)], "weights": [1.0],
                                                       "class_names": ["a"]}))
    cases = [
        ([str(tiny_run), str(few)], "expected at least 8"),
        ([str(ens), str(few)], "is an ensemble folder"),
        ([str(tiny_run), str(tmp_path / "missing")], "does not exist"),
        ([str(tiny_run), str(few), "--batch-size", "1"], "--batch-size 1"),
    ]
    for i, (args, message) in enumerate(cases):
        code = main(["adapt", *args, "--out", str(tmp_path / f"o{i}"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / f"o{i}").exists()
    # a network without BatchNorm (a ViT run) is named, not adapted
    monkeypatch.setattr("leukolab.pipelines.adapt.batchnorm_layers", lambda model: [])
    assert main(["adapt", str(tiny_run), str(wbc_small), "--out", str(tmp_path / "vit"), "--no-progress"]) == 2
    assert "has no BatchNorm layer" in capsys.readouterr().err and not (tmp_path / "vit").exists()
