from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from leukolab.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
from leukolab.pipelines import classify
from leukolab.pipelines.classify import evaluate_run, predict_images, train_classifier
from leukolab.training.loop import Trainer


@pytest.mark.slow
def test_training_run_writes_its_folder_loss_falls_and_beats_chance(tiny_run: Path) -> None:
    for name in ("config.yaml", "history.csv", "best.pt", "last.pt", "splits.csv", "curves.png"):
        assert (tiny_run / name).is_file(), name
    hist = pd.read_csv(tiny_run / "history.csv")
    assert len(hist) == 4
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert hist["val_balanced_accuracy"].max() > 0.4  # chance is 0.2 for 5 classes
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["model"]["backbone"] == "resnet10t" and cfg["train"]["epochs"] == 4
    assert len(list((tiny_run / "checkpoints").glob("epoch_*.pt"))) == 1  # keep_last=1
    ckpt = load_checkpoint(tiny_run / "best.pt")  # plain data: loads with weights_only=True
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["task"] == "classification"
    assert ckpt["class_names"] == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert "optimizer" not in ckpt and ckpt["backbone"]
    spec = ckpt["backbone_spec"]
    assert spec["name"] == "resnet10t" and spec["img_size"] == 32 and spec["patch_size"] is None
    assert set(ckpt["backbone"]) == set(classify.build_model(cfg, 5).backbone.state_dict())
    last = load_checkpoint(tiny_run / "last.pt")
    assert last["epoch"] == 4 and {"optimizer", "scheduler", "rng"} <= set(last)


@pytest.mark.slow
def test_evaluate_writes_metrics_predictions_and_plots(tiny_run: Path) -> None:
    out = evaluate_run(tiny_run, show_progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_macro", "per_class"):
        assert key in metrics
    assert metrics["balanced_accuracy"] > 0.3
    preds = pd.read_csv(out / "predictions.csv")
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    assert len(prob_cols) == 5 and list(preds.columns[:3]) == ["path", "actual", "predicted"]
    assert preds[prob_cols].sum(axis=1).sub(1).abs().max() < 1e-4
    assert (out / "confusion_matrix.png").stat().st_size > 1000 and (out / "curves.png").is_file()
    # a second evaluation never overwrites the first
    out2 = evaluate_run(tiny_run, show_progress=False)
    assert out2 != out and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_predict_agrees_with_the_labels_of_the_runs_test_images(tiny_run: Path, wbc_small: Path) -> None:
    assert len(predict_images(tiny_run, [wbc_small / "lymphocyte"])) == 30  # a folder: one row per image
    splits = pd.read_csv(tiny_run / "splits.csv")
    test = splits[splits["split"] == "test"]
    table = predict_images(tiny_run, [Path(p) for p in test["path"]])
    assert list(table["path"]) == list(test["path"])
    prob_cols = [c for c in table.columns if c.startswith("prob_")]
    assert table[prob_cols].sum(axis=1).sub(1).abs().max() < 1e-4
    accuracy = (table["predicted"].to_numpy() == test["label"].to_numpy()).mean()
    assert accuracy > 0.3 and table["predicted"].nunique() > 1  # chance is 0.2 for 5 classes
    # the predicted class is the most probable one
    assert (table[prob_cols].idxmax(axis=1).str.removeprefix("prob_") == table["predicted"]).all()


@pytest.mark.slow
def test_same_seed_same_metrics(wbc_small: Path, tmp_path: Path, tiny_overrides: Callable[..., dict]) -> None:
    over = tiny_overrides(wbc_small, **{"train.epochs": 1, "data.label_fraction": 0.5})
    a = train_classifier(tmp_path, overrides=over)
    b = train_classifier(tmp_path, overrides=over)
    assert a != b
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns="epoch_time_s"), hb.drop(columns="epoch_time_s"))
    assert (a / "splits.csv").read_text() == (b / "splits.csv").read_text()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(
    wbc_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_overrides: Callable[..., dict]
) -> None:
    over = tiny_overrides(wbc_small, **{"train.epochs": 2})
    full = train_classifier(tmp_path / "a", overrides=over)

    original = Trainer._end_epoch

    def crash_after_first(self: Trainer, row: dict[str, float]) -> None:
        original(self, row)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(tmp_path / "b", overrides=over)
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    (broken,) = list((tmp_path / "b").iterdir())
    assert len(pd.read_csv(broken / "history.csv")) == 1
    classify.train_classifier(resume=broken)
    h_full = pd.read_csv(full / "history.csv").drop(columns="epoch_time_s")
    h_res = pd.read_csv(broken / "history.csv").drop(columns="epoch_time_s")
    pd.testing.assert_frame_equal(h_full, h_res, atol=1e-5, rtol=1e-4)


def test_min_samples_per_epoch_repeats_a_small_labelled_set(wbc_small: Path) -> None:
    from collections import Counter

    from leukolab.data.readers import read_image_folder

    data = read_image_folder(wbc_small)
    few = type(data)(data.paths[:6], data.labels[:6])
    names = sorted(set(data.labels))
    loader = classify.make_loader(few, names, 32, 4, train=True, min_samples=24, seed=0)
    batches = [y for _, y in loader]
    assert len(batches) == 6 and all(len(y) == 4 for y in batches)
    plain = classify.make_loader(few, names, 32, 4, train=True, seed=0)
    assert sum(len(y) for _, y in plain) == 4  # one batch, drop_last
    # every image is seen equally often: whole passes over the data
    ds = loader.dataset
    idx = list(loader.sampler)
    assert Counter(idx) == Counter({i: 4 for i in range(len(ds))})


def test_layer_decay_gives_deeper_vit_blocks_larger_learning_rates(tmp_path: Path) -> None:
    from leukolab.errors import LeukolabError
    from leukolab.models.classifier import build_classifier
    from leukolab.objectives.classification import ClassificationObjective
    from leukolab.training.loop import TrainerConfig

    model = build_classifier({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 3}, "head": "linear",
                              "drop_path": 0.0}, 32, 3)
    objective = ClassificationObjective(model, ["a", "b", "c"], layer_decay=0.5)
    trainer = Trainer(objective, TrainerConfig(lr=1e-3, progress=False), tmp_path)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in objective.parameters() if p.requires_grad)  # every parameter, once
    bb = model.backbone
    stem, b0, b2 = (lr_of[id(p)] for p in (bb.patch_embed.proj.weight, bb.blocks[0].attn.qkv.weight,
                                           bb.blocks[2].attn.qkv.weight))
    # timm's grouping: stem, block 0, block 1, then block 2 with the final norm at the full rate
    assert stem < b0 < b2 == pytest.approx(1e-3)
    assert b0 / stem == pytest.approx(2.0) and b2 / b0 == pytest.approx(4.0)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in model.head.parameters())
    assert trainer.current_lr() == pytest.approx(1e-3)
    with pytest.raises(LeukolabError, match="layer decay"):
        ClassificationObjective(model, ["a", "b", "c"], layer_decay=1.5)


def test_linear_probe_standardises_frozen_features_and_only_the_head_learns(tmp_path: Path) -> None:
    from leukolab.models.classifier import build_classifier

    cfg = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 1}, "head": "linear", "drop_path": 0.0,
           "freeze_backbone": True, "probe_norm": True}
    torch.manual_seed(0)
    model = build_classifier(cfg, 32, 3).train()
    bn = model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.1.weight", "head.1.1.bias"]
    x = torch.randn(16, 3, 32, 32)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(x)  # batch statistics update the probe's norm, never the backbone
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone.state_dict().items())
    assert not isinstance(build_classifier({**cfg, "freeze_backbone": False}, 32, 3).head[0], torch.nn.BatchNorm1d)
    # runs written before this option existed have no key: their checkpoints keep the plain head
    old = {k: v for k, v in cfg.items() if k != "probe_norm"}
    assert not isinstance(build_classifier(old, 32, 3).head[0], torch.nn.BatchNorm1d)


def test_avg_pool_vit_takes_a_token_pool_checkpoint(tmp_path: Path) -> None:
    from leukolab.models.backbones import create_backbone
    from leukolab.models.weights import load_backbone_weights

    src = create_backbone("vit_tiny_patch16_224", 32, depth=1)
    torch.save({"backbone": src.state_dict(), "backbone_name": "vit_tiny_patch16_224"}, tmp_path / "pre.pt")
    dst = create_backbone("vit_tiny_patch16_224", 32, depth=1, global_pool="avg")
    report = load_backbone_weights(dst, tmp_path / "pre.pt")
    assert "fc_norm.weight" in report["loaded"] and not report["ignored"]
    assert torch.equal(dst.fc_norm.weight, src.norm.weight)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_build_model_keeps_a_frozen_backbone_frozen_after_loading_init(tmp_path: Path) -> None:
    from leukolab.models.backbones import create_backbone

    src = create_backbone("vit_tiny_patch16_224", 32, depth=1)
    torch.save({"backbone": src.state_dict(), "backbone_name": "vit_tiny_patch16_224"}, tmp_path / "pre.pt")
    cfg = {"model": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 1}, "head": "linear",
                     "drop_path": 0.0, "freeze_backbone": True, "probe_norm": True, "init": str(tmp_path / "pre.pt")},
           "data": {"img_size": 32}}
    model = classify.build_model(cfg, 3)
    assert model.freeze_backbone and not any(p.requires_grad for p in model.backbone.parameters())
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    model.train()
    assert not model.backbone.training and model.head.training
