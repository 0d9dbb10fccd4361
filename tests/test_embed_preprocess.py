"""``embed`` / ``viz`` on a classifier run feed images with the run's recorded preprocessing, as ``evaluate`` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leukolab.cli.main import main
from leukolab.data.dataset import load_rgb
from leukolab.data.transforms import eval_transform
from leukolab.evaluation.features import load_features
from leukolab.models.loading import load_any_backbone
from test_robust_pipeline import train_cell_crop_run  # the same tiny cell-crop run as the robustness tests

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch resnet10t run with --crop cell --stain-norm reinhard on 32-px synthetic cells (a few seconds)."""
    return train_cell_crop_run(tmp_path_factory)


def _images(run: Path) -> list[Path]:
    import yaml

    data = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["path"])
    return sorted((data / "monocyte").glob("*.png"))[:4]


def test_embed_of_a_run_equals_the_backbone_on_evaluates_images(stain_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from leukolab.pipelines.predictors import load_predictor

    paths = _images(stain_run)
    folder = tmp_path / "cells"
    folder.mkdir()
    for p in paths:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "f.npz"
    assert main(["embed", str(stain_run), str(folder), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "the run's image preprocessing applied as in evaluate: cell crop (margin 0.15), reinhard stain " \
           "normalisation" in capsys.readouterr().err
    fs = load_features(out)
    order = [Path(p).name for p in fs.paths]
    # the evaluate / predict path: RunPredictor.tensors (crop to the cell, shrink, Reinhard, resize, normalise)
    predictor = load_predictor(stain_run, device="cpu")
    backbone = predictor.model.backbone  # type: ignore[attr-defined]
    images = [load_rgb(folder / name) for name in order]
    with torch.no_grad():
        x = predictor.tensors(images)  # type: ignore[attr-defined]
        want = backbone(x).flatten(1).numpy()
        plain = backbone(torch.stack([eval_transform(32)(im) for im in images])).flatten(1).numpy()
    np.testing.assert_allclose(fs.features, want, atol=1e-5, rtol=0)
    assert not np.allclose(fs.features, plain, atol=1e-3)  # without the run's preprocessing they differ


def test_loaded_run_feeds_viz_as_evaluate_and_other_checkpoints_keep_the_plain_resize(stain_run: Path,
                                                                                      tmp_path: Path) -> None:
    from leukolab.checkpoints import load_checkpoint, save_checkpoint
    from leukolab.pipelines.predictors import load_predictor

    images = [load_rgb(p) for p in _images(stain_run)]
    loaded = load_any_backbone(stain_run, run_preprocessing=True)
    assert loaded.run_input is not None and loaded.run_input.preprocess is not None
    assert load_any_backbone(stain_run).run_input is None  # --fuse encoders: not asked for, unchanged
    tf = loaded.input_transform()
    want = load_predictor(stain_run, device="cpu").tensors(images)  # type: ignore[attr-defined]
    torch.testing.assert_close(torch.stack([tf(im) for im in images]), want, atol=1e-6, rtol=0)
    # a backbone file written from the run (no run config): the zoo path, plain resize as before
    state = load_checkpoint(stain_run / "best.pt")
    bare = save_checkpoint({"backbone": state["backbone"], "backbone_spec": state["backbone_spec"]},
                           tmp_path / "bare.pt")
    plain = load_any_backbone(bare, run_preprocessing=True)
    assert plain.run_input is None
    torch.testing.assert_close(torch.stack([plain.input_transform()(im) for im in images]),
                               torch.stack([eval_transform(32)(im) for im in images]))


def test_a_run_missing_its_stain_reference_is_a_one_line_error(stain_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "best.pt").write_bytes((stain_run / "best.pt").read_bytes())  # stain_norm.yaml left behind
    data = _images(stain_run)[0].parent
    code = main(["embed", str(copy), str(data), "--out", str(tmp_path / "f.npz"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stain_norm.yaml: cannot read the run's stain normaliser" in err and "\n" not in err


def test_mil_encoder_of_a_run_prepares_cells_as_evaluate(stain_run: Path, tmp_path: Path) -> None:
    """A classifier run as ``mil train --encoder`` embeds each cell as ``evaluate`` feeds it (cell crop + Reinhard);
    the preprocessing is recorded and keys the embedding cache apart from the plain resize."""
    from leukolab.data.mil import Cohort, Patient
    from leukolab.pipelines.mil_encoder import embed_cohort, load_encoder
    from leukolab.pipelines.predictors import load_predictor

    paths = _images(stain_run)
    encoder = load_encoder(stain_run)
    assert encoder.preprocessing == "cell crop (margin 0.15), reinhard stain normalisation"
    assert encoder.describe()["preprocessing"] == encoder.preprocessing
    cohort = Cohort([Patient("P1", 0, "F", 50.0, 5.0, tuple(paths[:2])),
                     Patient("P2", 1, "M", 70.0, 9.0, tuple(paths[2:]))])
    feats = torch.cat(embed_cohort(cohort, encoder, tmp_path / "cache", progress=False))
    predictor = load_predictor(stain_run, device="cpu")
    with torch.no_grad():
        want = predictor.model.backbone(predictor.tensors([load_rgb(p) for p in paths]))  # type: ignore[attr-defined]
    torch.testing.assert_close(feats, want.flatten(1), atol=1e-5, rtol=0)
    timm_floor = load_encoder("resnet10t", 32)
    assert timm_floor.preprocessing == "none" and timm_floor.transform is None
