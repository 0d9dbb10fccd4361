"""Dihedral test-time augmentation, fitted ensemble weights, and ensemble folders in evaluate / predict."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import log_loss as sk_log_loss
from torch import nn

from leukolab.checkpoints import load_checkpoint
from leukolab.cli.main import main
from leukolab.evaluation.ensemble_weights import balanced_accuracy, fit_weights, log_loss, mix
from leukolab.models.tta import dihedral_views, tta_probabilities
from leukolab.pipelines.predictors import EnsemblePredictor, load_predictor


# --------------------------------------------------------------------------- TTA
def test_dihedral_views_are_the_eight_distinct_transforms_and_form_a_group() -> None:
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    views = [tuple(v.flatten().tolist()) for v in dihedral_views(x)]
    assert len(set(views)) == 8 and views[0] == tuple(x.flatten().tolist())
    for moved in (torch.rot90(x, 1, (-2, -1)), torch.flip(x, (-2,)), x.transpose(-1, -2)):
        assert {tuple(v.flatten().tolist()) for v in dihedral_views(moved)} == set(views)  # closed under D4


def _symmetric_kernel(w: torch.Tensor) -> torch.Tensor:
    """``w`` averaged over its 8 dihedral images: a kernel that every flip/rotation leaves unchanged."""
    return torch.stack(list(dihedral_views(w))).mean(0)


def _conv_net(symmetric: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    if symmetric:
        with torch.no_grad():
            conv.weight.copy_(_symmetric_kernel(conv.weight))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


class _MeanOfViews(nn.Module):
    """Any network made invariant by averaging its logits over the 8 views."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.net(v) for v in dihedral_views(x)]).mean(0)


@pytest.mark.parametrize("invariant", [_conv_net(symmetric=True), _MeanOfViews(_conv_net(symmetric=False))])
def test_tta_of_a_dihedral_invariant_model_changes_nothing(invariant: nn.Module) -> None:
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    plain = tta_probabilities(invariant, x, tta=False)
    assert plain.std(0).max() > 1e-3  # the model does depend on its input
    torch.testing.assert_close(tta_probabilities(invariant, x, tta=True), plain, atol=1e-6, rtol=1e-5)


def test_tta_of_a_plain_model_differs_and_is_invariant_itself() -> None:
    model = _conv_net(symmetric=False)
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    plain, tta = tta_probabilities(model, x, tta=False), tta_probabilities(model, x, tta=True)
    assert (plain - tta).abs().max() > 1e-3
    torch.testing.assert_close(tta.sum(1), torch.ones(6))
    rotated = torch.rot90(torch.flip(x, (-1,)), 1, (-2, -1))
    torch.testing.assert_close(tta_probabilities(model, rotated, tta=True), tta, atol=1e-6, rtol=1e-5)


def test_a_run_with_tta_gives_the_same_answer_for_a_rotated_cell(tiny_run: Path, wbc_small: Path) -> None:
    images = [Image.open(p).convert("RGB") for p in sorted((wbc_small / "monocyte").glob("*.png"))[:6]]
    moved = [im.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    plain = load_predictor(tiny_run, tta=False)
    tta = dataclasses.replace(plain, tta=True)
    np.testing.assert_allclose(tta.predict_images(moved), tta.predict_images(images), atol=1e-5)
    assert np.abs(plain.predict_images(moved) - plain.predict_images(images)).max() > 1e-4


# --------------------------------------------------------------------------- ensemble weights
def _members(n: int = 240, k: int = 4, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """A perfect (confident, always right) member between two members that guess."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    perfect = np.full((n, k), 0.02)
    perfect[np.arange(n), y] = 1 - 0.02 * (k - 1)
    return [rng.dirichlet(np.ones(k), n), perfect, rng.dirichlet(np.ones(k), n)], y


@pytest.mark.parametrize("objective", ["log_loss", "balanced_accuracy"])
def test_a_perfect_member_takes_all_the_weight(objective: str) -> None:
    probs, y = _members()
    w = fit_weights(probs, y, objective)
    assert w.shape == (3,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w[1] > 0.99
    assert fit_weights(probs[::-1], y, objective)[1] > 0.99  # the order of the members does not matter


def test_balanced_accuracy_weights_beat_every_member_and_the_log_loss_weights() -> None:
    rng = np.random.default_rng(3)
    n, k = 400, 5
    y = rng.integers(0, k, n)
    members = []
    for good in ([0, 1, 2], [2, 3, 4]):  # each member knows some classes, and guesses elsewhere
        p = rng.dirichlet(np.ones(k), n)
        p[np.arange(n), y] += 0.6 * np.isin(y, good)
        members.append(p / p.sum(1, keepdims=True))
    w_ba, w_ll = fit_weights(members, y, "balanced_accuracy"), fit_weights(members, y, "log_loss")
    ba = balanced_accuracy(mix(members, w_ba), y)
    assert ba >= max(balanced_accuracy(p, y) for p in members) + 0.02  # the mix is better than either member
    assert ba >= balanced_accuracy(mix(members, w_ll), y)
    assert log_loss(mix(members, w_ll), y) <= min(log_loss(mix(members, w), y) for w in ([0.5, 0.5], w_ba)) + 1e-9
    assert 0.1 < w_ll[0] < 0.9  # complementary members are both used


def test_scores_match_scikit_learn() -> None:
    probs, y = _members(seed=5)
    p = mix(probs, [0.2, 0.3, 0.5])
    assert log_loss(p, y) == pytest.approx(sk_log_loss(y, p, labels=range(4)))
    assert balanced_accuracy(p, y) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))


# --------------------------------------------------------------------------- ensemble folders
def _variant(run: Path, dest: Path, **changes: object) -> Path:
    """A copy of ``run`` whose checkpoint says something else (``img_size=48``, ``class_names=[...]``, ``task``)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "last.pt", "eval*"))
    state = load_checkpoint(dest / "best.pt")
    if "img_size" in changes:
        state["config"]["data"]["img_size"] = changes.pop("img_size")
    state.update(changes)
    torch.save(state, dest / "best.pt")
    return dest


@pytest.fixture(scope="module")
def small_val(wbc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 images of each class of ``wbc_small`` (TTA costs 8 forward passes per image)."""
    out = tmp_path_factory.mktemp("val") / "val"
    for folder in sorted(p for p in wbc_small.iterdir() if p.is_dir() and p.name != "masks"):
        (out / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:4]:
            shutil.copy(f, out / folder.name / f.name)
    return out


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("variants")
    names = load_checkpoint(tiny_run / "best.pt")["class_names"]
    return {
        "at48": _variant(tiny_run, tmp / "at48", img_size=48),  # the same weights applied at another input size
        "renamed": _variant(tiny_run, tmp / "renamed", class_names=[*names[:-1], "plasma_cell"]),
        "detector": _variant(tiny_run, tmp / "detector", task="detection"),
    }


def test_ensemble_fit_then_evaluate_and_predict_accept_the_folder(
    tiny_run: Path, runs: dict[str, Path], small_val: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ens = tmp_path / "ens"
    assert main(["ensemble", "fit", str(tiny_run), str(runs["at48"]), "--data", str(small_val), "--out", str(ens),
                 "--no-progress"]) == 0
    assert "ensemble (log_loss)" in capsys.readouterr().out
    spec = yaml.safe_load((ens / "ensemble.yaml").read_text())
    assert spec["members"] == [str(tiny_run.resolve()), str(runs["at48"].resolve())]
    assert all(Path(m).is_absolute() for m in spec["members"]) and spec["tta"] is False
    assert spec["objective"] == "log_loss" and spec["data"] == str(small_val.resolve())
    assert sum(spec["weights"]) == pytest.approx(1.0) and min(spec["weights"]) >= 0
    members = pd.read_csv(ens / "members.csv")
    assert list(members["img_size"]) == [32, 48] and list(members["backbone"]) == ["resnet10t"] * 2
    fitted = json.loads((ens / "metrics.json").read_text())
    assert fitted["n"] == 20 and fitted["log_loss"] <= members["log_loss"].min() + 1e-6  # the optimum beats a vertex

    # the folder predicts the weighted mean of its members, each at its own input size
    ens_pred = load_predictor(ens)
    assert isinstance(ens_pred, EnsemblePredictor)
    images = [Image.open(p).convert("RGB") for p in sorted((small_val / "basophil").glob("*.png"))]
    a, b = (load_predictor(r).predict_images(images) for r in (tiny_run, runs["at48"]))
    assert np.abs(a - b).max() > 1e-3  # 48 px is another input
    np.testing.assert_allclose(ens_pred.predict_images(images), spec["weights"][0] * a + spec["weights"][1] * b,
                               atol=1e-5)

    assert main(["evaluate", str(ens), "--data", str(small_val), "--tta", "--no-progress"]) == 0
    out = ens / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] is True and metrics["n"] == 20
    assert (out / "predictions.csv").is_file() and (out / "confusion_matrix.png").is_file()
    assert not (out / "curves.png").exists()  # an ensemble has no training history
    # without --data: the test split the members share (both are copies of one run)
    assert main(["evaluate", str(ens), "--no-progress", "--no-check-images"]) == 0
    split = pd.read_csv(tiny_run / "splits.csv")
    assert json.loads((ens / "eval-2" / "metrics.json").read_text())["n"] == int((split["split"] == "test").sum())

    table_csv = tmp_path / "pred.csv"
    assert main(["predict", str(ens), str(small_val / "basophil"), "--out", str(table_csv), "--no-progress"]) == 0
    table = pd.read_csv(table_csv)
    assert len(table) == 4 and table["path"].tolist() == [str(p) for p in sorted((small_val / "basophil").glob("*"))]
    probs = table[[f"prob_{c}" for c in spec["class_names"]]].to_numpy()
    np.testing.assert_allclose(probs, ens_pred.predict_images(images), atol=1e-5)


@pytest.mark.parametrize(
    ("members", "extra", "expected"),
    [
        (["detector"], [], "is not a classification run"),
        (["run", "renamed"], [], "expected every member to have the same class list"),
        ([], [], "Missing argument"),
        (["run"], ["--objective", "accuracy"], "--objective 'accuracy'"),
        (["run"], ["--data", "{unknown}"], "class 'plasma_cell' is unknown to the members"),
    ],
)
def test_ensemble_fit_bad_input_is_one_line_and_exit_2(
    members: list[str], extra: list[str], expected: str, tiny_run: Path, runs: dict[str, Path], small_val: Path,
    wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    unknown = tmp_path / "val"
    for c in ("basophil", "plasma_cell"):
        (unknown / c).mkdir(parents=True)
        shutil.copy(next((wbc_small / "basophil").glob("*.png")), unknown / c / "a.png")
    paths = [str(tiny_run if m == "run" else runs[m]) for m in members]
    data = ["--data", str(small_val)] if "--data" not in extra else []
    args = ["ensemble", "fit", *paths, *data, *[e.replace("{unknown}", str(unknown)) for e in extra],
            "--out", str(tmp_path / "ens"), "--no-progress"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not (tmp_path / "ens").exists()
