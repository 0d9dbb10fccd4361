"""Issue 14's image options in the classifier pipeline: cell crops, mask paste, stain normalisation, applied
identically at train, evaluate and predict time; bad input as one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from leukolab.data.dataset import load_rgb, shrink
from leukolab.data.image_options import ImageOptions
from leukolab.data.mask_aug import BACKGROUND_KINDS, MaskPaste
from leukolab.data.preprocess import STAIN_NORM_FILE, CellPrep, crop_pair, crop_to_cell, run_preprocess
from leukolab.data.stain import ReinhardNormaliser
from leukolab.data.synthetic import make_wbc_dataset
from leukolab.data.synthetic.cells import render_cell
from leukolab.data.transforms import eval_transform
from leukolab.errors import LeukolabError

torch.set_num_threads(1)

NEW_KEYS = ("masks", "crop", "crop_margin", "stain_aug", "jitter", "degrade", "stain_norm", "stain_ref",
            "mask_aug", "mask_bg")


def _cell(seed: int = 0, size: int = 48, label: str = "lymphocyte") -> tuple[Image.Image, np.ndarray]:
    img, mask = render_cell(label, size, np.random.default_rng(seed), 0.2)
    return Image.fromarray(img), mask


class _Pairs:
    """A BackgroundSource of fixed images."""

    def __init__(self, pairs: list[tuple[Image.Image, np.ndarray]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        return self.pairs[i]


@pytest.mark.parametrize("kind", BACKGROUND_KINDS)
def test_mask_paste_keeps_the_cell_and_changes_only_the_background(kind: str) -> None:
    image, mask = _cell(0)
    paste = MaskPaste(1.0, _Pairs([_cell(1, label="neutrophil"), _cell(2, label="monocyte")]), kind, n_synthetic=2)
    torch.manual_seed(0)
    before, after = np.asarray(image), np.asarray(paste(image, mask))
    assert after.shape == before.shape
    assert np.array_equal(after[mask], before[mask])  # the cell's pixels untouched
    changed = (after != before).any(axis=2)
    assert changed[~mask].mean() > 0.5  # the background replaced
    assert not changed[mask].any()


def test_mask_paste_probability_zero_is_the_identity_and_estimates_a_missing_mask() -> None:
    image, mask = _cell(3)
    assert MaskPaste(0.0)(image, mask) is image
    torch.manual_seed(0)
    out = np.asarray(MaskPaste(1.0, mode="plain")(image, None))  # mask estimated by segment_cell
    inner = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    inner[int(np.median(ys)) - 3:int(np.median(ys)) + 3, int(np.median(xs)) - 3:int(np.median(xs)) + 3] = True
    assert np.array_equal(out[inner], np.asarray(image)[inner])  # the cell's centre survives
    with pytest.raises(LeukolabError, match="--mask-bg 'sky'"):
        MaskPaste(0.5, mode="sky")


def test_cell_crops_of_one_cell_at_two_scales_frame_it_alike() -> None:
    image, mask = _cell(4)
    # the same cell imaged at twice the magnification, off-centre in a bigger field
    big = image.resize((96, 96), Image.Resampling.BICUBIC)
    field = np.empty((170, 160, 3), np.uint8)
    field[:] = np.median(np.asarray(image).reshape(-1, 3), axis=0).astype(np.uint8)
    field[60:156, 20:116] = np.asarray(big)
    field_mask = np.zeros((170, 160), bool)
    field_mask[60:156, 20:116] = np.asarray(Image.fromarray(mask).resize((96, 96), Image.Resampling.NEAREST))

    small_crop, small_mask = crop_pair(image, mask, 0.15)
    big_crop, big_mask = crop_pair(Image.fromarray(field), field_mask, 0.15)
    assert abs(big_crop.width / 2 - small_crop.width) <= 1 and big_crop.width == big_crop.height
    # resized to the training size, the cell covers the same share of either crop
    share = [np.asarray(Image.fromarray(m).resize((32, 32), Image.Resampling.NEAREST)).mean()
             for m in (small_mask, big_mask)]
    assert share[0] > 0.4 and abs(share[0] - share[1]) < 0.03
    # estimated masks (segment_cell) frame it alike too; an uncropped image would differ 2x in size
    est_small, est_big = crop_to_cell(image, None, 0.15), crop_to_cell(Image.fromarray(field), None, 0.15)
    assert abs(est_big.width / (2 * est_small.width) - 1) < 0.15
    assert abs(est_small.width / small_crop.width - 1) < 0.15


def test_an_empty_given_mask_stops_a_cell_crop_naming_the_image(tmp_path: Path) -> None:
    image, _ = _cell(5, size=32)
    image.save(tmp_path / "cell.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "cell_mask.png")
    with pytest.raises(LeukolabError, match=r"cell\.png.*empty"):
        CellPrep([tmp_path / "cell_mask.png"], crop_margin=0.15)(0, image, 64, tmp_path / "cell.png")
    with pytest.raises(LeukolabError, match=r"image.*empty"):
        crop_to_cell(image, np.zeros((32, 32), bool), 0.15)
    # an image in which no cell is found is kept whole at evaluation time, and counted
    pre = run_preprocess({"img_size": 32, "crop": "cell", "crop_margin": 0.15}, None)
    assert pre is not None
    blank = Image.new("RGB", (40, 40), (230, 220, 225))
    with pytest.warns(UserWarning, match="no cell found"):
        assert pre(blank).size == (40, 40)
    assert pre.fallbacks == 1


# --------------------------------------------------------------------------- a trained run
def train_cell_crop_run(factory: pytest.TempPathFactory, **data_options: object) -> Path:
    """A 1-epoch resnet10t run with --crop cell --stain-norm reinhard (plus ``data_options``) on 32-px cells."""
    from leukolab.pipelines.classify import train_classifier

    data = make_wbc_dataset(factory.mktemp("wbc") / "data", 6, size=32, seed=0, difficulty=0.2, progress=False)
    return train_classifier(factory.mktemp("runs"), overrides={
        "data.path": str(data), "data.img_size": 32, "data.batch_size": 8, "model.backbone": "resnet10t",
        "model.drop_path": 0.0, "optim.warmup_epochs": 0, "train.epochs": 1, "train.progress": False,
        "train.device": "cpu", "data.check_images": False, "seed": 0, "data.crop": "cell",
        "data.stain_norm": "reinhard", **{f"data.{k}": v for k, v in data_options.items()},
    })


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run with --crop cell --stain-norm reinhard --mask-aug 0.5 --stain-aug 0.5 on 32-px cells."""
    return train_cell_crop_run(tmp_path_factory, mask_aug=0.5, stain_aug=0.5, mask_bg="mixed")


def _manual_probs(run: Path, paths: list[Path], preprocess: bool = True) -> np.ndarray:
    """Crop to the estimated cell, shrink, Reinhard-normalise with the run's stored state, resize, forward."""
    from leukolab.pipelines.classify import load_run

    objective, cfg = load_run(run, torch.device("cpu"))
    tf = eval_transform(32)
    xs = []
    for p in paths:
        im = load_rgb(p)
        if preprocess:
            norm = ReinhardNormaliser.from_state(yaml.safe_load((run / STAIN_NORM_FILE).read_text())["state"])
            im = norm(shrink(crop_to_cell(im, None, cfg["data"]["crop_margin"]), 64))
        xs.append(tf(im))
    with torch.no_grad():
        return torch.softmax(objective.model(torch.stack(xs)), 1).numpy()


def test_a_run_stores_its_stain_reference_and_evaluate_predict_apply_its_preprocessing(robust_run: Path) -> None:
    from leukolab.pipelines.classify import evaluate_run, predict_images

    cfg = yaml.safe_load((robust_run / "config.yaml").read_text())
    assert cfg["data"]["crop"] == "cell" and cfg["data"]["masks"].endswith("masks")  # the default masks/ folder
    stored = yaml.safe_load((robust_run / STAIN_NORM_FILE).read_text())
    assert stored["method"] == "reinhard" and len(stored["state"]["mean"]) == 3

    out = evaluate_run(robust_run, show_progress=False, check_images=False)
    table = pd.read_csv(out / "predictions.csv")
    names = [c[len("prob_"):] for c in table.columns if c.startswith("prob_")]
    paths = [Path(p) for p in table["path"]]
    expected = _manual_probs(robust_run, paths)
    np.testing.assert_allclose(table[[f"prob_{c}" for c in names]].to_numpy(), expected, atol=1e-5)
    # the preprocessing matters: without it the probabilities differ
    assert not np.allclose(_manual_probs(robust_run, paths, preprocess=False), expected, atol=1e-4)

    predicted = predict_images(robust_run, paths[:3])
    assert predicted is not None
    np.testing.assert_allclose(predicted[[f"prob_{c}" for c in names]].to_numpy(), expected[:3], atol=1e-5)


def test_a_run_config_without_the_new_keys_still_evaluates(robust_run: Path, tmp_path: Path) -> None:
    from leukolab.pipelines.classify import evaluate_run
    from leukolab.pipelines.predictors import load_predictor

    old = tmp_path / "old-run"
    shutil.copytree(robust_run, old, ignore=shutil.ignore_patterns("eval*", STAIN_NORM_FILE))
    for name in ("best.pt", "last.pt"):
        state = torch.load(old / name, weights_only=True)
        for key in NEW_KEYS:
            state["config"]["data"].pop(key, None)
        torch.save(state, old / name)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for key in NEW_KEYS:
        cfg["data"].pop(key)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    predictor = load_predictor(old)
    assert predictor.preprocess is None  # type: ignore[attr-defined]
    out = evaluate_run(old, show_progress=False, check_images=False)
    table = pd.read_csv(out / "predictions.csv")
    names = [c for c in table.columns if c.startswith("prob_")]
    paths = [Path(p) for p in table["path"]]
    np.testing.assert_allclose(table[names].to_numpy(), _manual_probs(old, paths, preprocess=False), atol=1e-5)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wbc_dataset(tmp_path_factory.mktemp("wbc2") / "data", 2, size=32, seed=1, classes=("lymphocyte",
                            "neutrophil"), progress=False)


@pytest.mark.parametrize(("args", "expected"), [
    (["--stain-norm", "vahadane"], "stain normalisation 'vahadane' is unknown"),
    (["--mask-bg", "sky"], "--mask-bg 'sky'"),
    (["--crop", "nucleus"], "--crop 'nucleus'"),
    (["--mask-aug", "1.5"], "--mask-aug 1.5"),
    (["--stain-norm", "reinhard", "--stain-ref", "{data}/metadata.csv"], "--stain-ref"),
    (["--stain-norm", "reinhard", "--stain-ref", "/no/such/ref.png"], "/no/such/ref.png does not exist"),
    (["--crop", "cell", "--masks", "{other_masks}"], "no mask file matches"),
    (["--crop", "cell", "--masks", "{wrong_size}"], "is 20x20 but image"),
])
def test_bad_image_options_are_one_line_errors(args: list[str], expected: str, small_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from leukolab.cli.main import main

    other = tmp_path / "other_masks"
    other.mkdir()
    Image.new("L", (32, 32), 255).save(other / "zzz.png")
    wrong = tmp_path / "wrong_size" / "lymphocyte"
    wrong.mkdir(parents=True)
    for p in (small_data / "lymphocyte").glob("*.png"):
        Image.new("L", (20, 20), 255).save(wrong / p.name)
    fill = {"data": str(small_data), "other_masks": str(other), "wrong_size": str(wrong.parent)}
    out = tmp_path / "runs"
    code = main(["train", str(small_data), "--out", str(out), "--img-size", "32", "--epochs", "1", "--backbone",
                 "resnet10t", "--device", "cpu", *[a.format(**fill) for a in args]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_image_options_off_give_the_plain_pipeline(small_data: Path) -> None:
    paths = sorted((small_data / "lymphocyte").glob("*.png"))
    opts = ImageOptions({"img_size": 32})
    assert opts.eval_preprocess() is None
    ds = opts.train_dataset(paths, [0] * len(paths), augment=False)
    assert ds.cells is None and ds.paired is None and ds.prepare is None
    expected = eval_transform(32)(load_rgb(paths[0]))
    assert torch.equal(ds[0][0], expected)
