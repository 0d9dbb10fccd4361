"""``leukolab train --fuse``: frozen encoders (each fed at its own size and normalisation), one trained head."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F

from leukolab.checkpoints import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, load_checkpoint, save_checkpoint
from leukolab.cli.main import main
from leukolab.config import resolve
from leukolab.data.synthetic import make_wbc_dataset
from leukolab.models.classifier import build_classifier
from leukolab.models.fusion import EncoderRecord, FusedEncoder, FusionBackbone
from leukolab.objectives.classification import ClassificationObjective
from leukolab.pipelines.classify import build_model, train_classifier
from leukolab.pipelines.fusion import prepare_fusion
from leukolab.pipelines.predictors import load_predictor


def _base(data: Path, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "data.path": str(data), "data.batch_size": 16, "data.check_images": False,
        "model.backbone": "test_efficientnet", "model.drop_path": 0.0, "optim.warmup_epochs": 0, "train.epochs": 1,
        "train.progress": False, "train.keep_last": 0, "seed": 0, "train.device": "cpu",  # no autocast: exact
    }
    base.update(extra)
    return base


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny CPU models: one thread (two oversubscribe a shared machine, many times slower), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny data, two 1-epoch runs (timm's test nets) at 32 and 48 px, and run B as a 'converted' file with
    ImageNet statistics."""
    root = tmp_path_factory.mktemp("fusion")
    data = make_wbc_dataset(root / "data", 12, size=32, seed=0, difficulty=0.0, progress=False)
    a = train_classifier(root / "runs", overrides=_base(data, **{"data.img_size": 32}))
    b = train_classifier(root / "runs", overrides=_base(data, **{"data.img_size": 48, "model.backbone": "test_resnet"}))
    state = load_checkpoint(b / "best.pt")
    spec = BackboneSpec("test_resnet", {}, 48, None, IMAGENET_MEAN, IMAGENET_STD)
    converted = root / "converted.pt"
    save_checkpoint({"task": "converted", "backbone": state["backbone"], "backbone_spec": spec.to_dict()}, converted)
    return {"data": data, "a": a, "b": b, "converted": converted}


def _record(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> EncoderRecord:
    return EncoderRecord("x", "run", "resnet10t", "timm", {}, size, list(mean), list(std), 4)


def test_each_encoder_gets_the_shared_input_at_its_own_size_and_normalisation() -> None:
    torch.manual_seed(0)
    u = torch.rand(2, 3, 48, 48)  # pixels in [0, 1]
    shared = (u - 0.5) / 0.25  # leukolab's eval_transform normalisation at the shared 48 px
    fused = FusedEncoder(torch.nn.Identity(), _record(32, IMAGENET_MEAN, IMAGENET_STD), 48, (0.5,) * 3, (0.25,) * 3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (F.interpolate(u, size=(32, 32), mode="bilinear", antialias=True) - mean) / std
    assert torch.allclose(fused.prepare(shared), expected, atol=1e-5)
    same = FusedEncoder(torch.nn.Identity(), _record(48, (0.5,) * 3, (0.25,) * 3), 48, (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(same.prepare(shared), shared)  # nothing to do: the input as it is
    assert FusedEncoder(torch.nn.Flatten(), _record(1, (0.5,) * 3, (0.25,) * 3), 1, (0.5,) * 3, (0.25,) * 3,
                        norm="l2")(shared).norm(dim=1).allclose(torch.ones(2))


def test_a_training_step_changes_the_head_only(encoders: dict[str, Path]) -> None:
    cfg = resolve("train", None, _base(encoders["data"], **{"model.fuse": [str(encoders["a"]), str(encoders["b"])],
                                                            "model.head": "mlp"}))
    prepare_fusion(cfg)
    model = build_model(cfg, 5)
    assert isinstance(model.backbone, FusionBackbone) and model.backbone.num_features == 256 + 96
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    objective = ClassificationObjective(model, [str(i) for i in range(5)])
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    opt = torch.optim.AdamW(objective.parameter_groups(0.05), lr=1e-2)
    objective.train()
    objective.training_step((torch.randn(6, 3, 48, 48), torch.arange(6) % 5)).loss.backward()
    opt.step()
    after = objective.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.head.") for k in changed)  # weights and batch-norm stats below: same


def test_fusion_run_resolves_sizes_and_norms_keeps_encoders_and_evaluates_without_its_sources(
        encoders: dict[str, Path], tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    a, conv = sources / "a", sources / "converted.pt"
    shutil.copytree(encoders["a"], a)
    shutil.copy(encoders["converted"], conv)
    out = tmp_path / "runs"
    assert main(["train", str(encoders["data"]), "--fuse", str(a), "--fuse", str(conv), "--fuse-head", "linear",
                 "--out", str(out), "--epochs", "2", "--batch-size", "16", "--no-check-images", "--seed", "0"]) == 0
    (run,) = out.iterdir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["backbone"] == "fusion" and cfg["data"]["img_size"] == 48 and not cfg["data"]["augment"]
    rec_a, rec_c = cfg["model"]["backbone_kwargs"]["encoders"]
    assert rec_a["img_size"] == 32 and rec_a["notes"] == ["input resized from the shared 48 px to its own 32 px"]
    assert rec_c["img_size"] == 48 and rec_c["kind"] == "converted" and len(rec_c["notes"]) == 1
    assert rec_c["notes"][0].startswith("input renormalised from leukolab (mean (0.5, 0.5, 0.5) std (0.25, 0.25, "
                                        "0.25)) to its own imagenet (mean (0.485")
    # the encoders in the checkpoint are the sources' weights, untouched by training
    objective = load_checkpoint(run / "best.pt")["objective"]
    for i, source in enumerate((a / "best.pt", conv)):
        for key, value in load_checkpoint(source)["backbone"].items():
            assert torch.equal(objective[f"model.backbone.encoders.{i}.encoder.{key}"], value), key
    history = pd.read_csv(run / "history.csv")
    assert history["trainable_params"].iloc[0] == (256 + 96) * 5 + 5  # the linear head only
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    # a source run trained with a cell crop and stain normalisation: the fusion run says what it feeds instead
    state_a = load_checkpoint(a / "best.pt")
    state_a["config"]["data"].update(crop="cell", stain_norm="reinhard")
    save_checkpoint(state_a, a / "best.pt")
    resolved = resolve("train", None, {**_base(encoders["data"]), "model.fuse": [str(a)]})
    (record,) = prepare_fusion(resolved)
    assert record.notes[-2:] == [
        "trained with --crop cell, fed --crop none here (this run's --crop applies to every encoder)",
        "trained with --stain-norm reinhard, fed --stain-norm none here (this run's --stain-norm applies to every "
        "encoder)"]
    shutil.rmtree(sources)  # the run carries its encoders
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    first, second = (pd.read_csv(run / name / "predictions.csv") for name in ("eval", "eval-2"))
    pd.testing.assert_frame_equal(first, second)
    # another lab's folders: upper-case names, two of the five classes
    lab = tmp_path / "lab"
    for old, new in (("eosinophil", "EOSINOPHIL"), ("monocyte", "Monocyte")):
        shutil.copytree(encoders["data"] / old, lab / new)
    assert main(["evaluate", str(run), "--data", str(lab), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["n_classes_present"] == 2


def test_cached_features_train_the_same_head_as_on_the_fly(encoders: dict[str, Path], tmp_path: Path) -> None:
    fuse = {"model.fuse": [str(encoders["a"]), str(encoders["b"])], "data.augment": False, "train.epochs": 2,
            "data.img_size": 48}
    runs = {cache: train_classifier(tmp_path / str(cache), overrides=_base(encoders["data"], **fuse,
                                                                            **{"model.fuse_cache": cache}))
            for cache in (True, False)}
    heads = {cache: {k: v for k, v in load_checkpoint(r / "last.pt")["objective"].items() if ".head." in k}
             for cache, r in runs.items()}
    assert heads[True].keys() == heads[False].keys() and heads[True]
    for key, value in heads[True].items():
        assert torch.allclose(value, heads[False][key], atol=1e-5), key
    h = {cache: pd.read_csv(r / "history.csv") for cache, r in runs.items()}
    assert h[True]["val_loss"].tolist() == pytest.approx(h[False]["val_loss"].tolist(), abs=1e-5)
    images = sorted((encoders["data"] / "lymphocyte").glob("*.png"))[:4]
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in images]
    p_cached, p_fly = (load_predictor(runs[c], device="cpu").predict_images(pil) for c in (True, False))
    assert torch.allclose(torch.as_tensor(p_cached), torch.as_tensor(p_fly), atol=1e-5)


def test_bad_fuse_inputs_are_one_line_errors(encoders: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, out = encoders["data"], tmp_path / "out"
    image = next((data / "basophil").glob("*.png"))
    cases = [
        (["--fuse", str(tmp_path / "nope")], "does not exist; expected a leukolab run folder or a checkpoint file"),
        (["--fuse", str(data)], "not usable as an encoder"),
        (["--fuse", str(image)], "not usable as an encoder"),
        (["--fuse-norm", "l2"], "--fuse-norm applies to a fusion run; expected --fuse RUN"),
        (["--fuse", str(encoders["a"]), "--fuse-norm", "bn"], "--fuse-norm 'bn': expected one of none, l2"),
        (["--fuse", str(encoders["a"]), "--init", str(encoders["b"])], "--init and --fuse"),
        (["--fuse", str(encoders["a"]), "--img-size", "64"], "--img-size and --fuse"),
    ]
    for args, message in cases:
        assert main(["train", str(data), "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists()  # nothing written
    # one encoder is a frozen-encoder probe; none is an ordinary run
    cfg = resolve("train", None, _base(data, **{"model.fuse": [str(encoders["b"])]}))
    (record,) = prepare_fusion(cfg)
    assert record.img_size == 48 and record.notes == [] and cfg["model"]["freeze_backbone"]
    plain = resolve("train", None, _base(data))
    assert prepare_fusion(plain) == [] and plain["model"]["backbone"] == "test_efficientnet"
    assert build_classifier(cfg["model"], 48, 5).backbone.num_features == 96
