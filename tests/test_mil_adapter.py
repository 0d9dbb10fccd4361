"""``leukolab mil train --finetune-encoder --adapter NAME``: a frozen ViT encoder, an adapter and the aggregator
train; the run keeps the small adapter (the encoder by reference) and ``mil evaluate`` restores its predictions."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from leukolab.checkpoints import BackboneSpec, save_checkpoint
from leukolab.cli.main import main
from leukolab.config import resolve
from leukolab.data.mil import read_cohort
from leukolab.data.synthetic.patients import PatientOptions, make_patients
from leukolab.data.transforms import mean_std
from leukolab.models.backbones import create_backbone
from leukolab.models.loading import reinitialise
from leukolab.pipelines.mil import BagData, build_objective, dataset, loader, train_mil
from leukolab.pipelines.mil_encoder import embed_cohort, load_encoder
from leukolab.training.loop import Trainer, TrainerConfig

# 12 patients (6 / 6), 3-5 cells of 32 px; a ViT-Tiny at 32 px (4 patches): seconds on one CPU thread
TINY = PatientOptions(n_patients=12, cells_min=3, cells_max=5, size=32, seed=1, tumoral_fraction=0.5)
CLIN = ("age", "lymph_count")


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patients(tmp_path_factory.mktemp("mil-adapter") / "bags", TINY, progress=False)


def _vit_file(path: Path, seed: int = 0) -> Path:
    """A leukolab-style encoder checkpoint (``backbone`` + ``backbone_spec``) of a seeded 2-block ViT-Tiny at 32 px."""
    mean, std = mean_std("leukolab")
    spec = BackboneSpec("vit_tiny_patch16_224", {"depth": 2}, 32, 16, tuple(mean), tuple(std))
    model = create_backbone(spec.name, 32, depth=2)
    reinitialise(model, seed)
    save_checkpoint({"backbone": model.state_dict(), "backbone_spec": spec.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _vit_file(tmp_path_factory.mktemp("encoder") / "vit_tiny.pt")


def _cfg(**extra: object) -> dict:
    return resolve("mil", None, {"encoder.finetune": True, "encoder.adapter": "lora", "encoder.cells_per_bag": 2,
                                 "encoder.adapter_kwargs.lora.rank": 2, "data.batch_size": 4,
                                 "data.passes_per_epoch": 1, "model.hidden": 16, "train.progress": False,
                                 "train.epochs": 1, **extra})


def test_only_the_adapter_and_aggregator_train_and_the_encoder_stays_bit_identical(
    bags: Path, vit_file: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    cohort = read_cohort(bags)
    encoder = load_encoder(vit_file, 32)
    data = BagData.of(cohort, embed_cohort(cohort, encoder, None, progress=False), CLIN)
    every = np.arange(len(cohort))
    objective = build_objective(cfg, data, every, "abmil", CLIN, encoder)
    assert objective.encoder is not encoder.model  # a copy is adapted; the caller's encoder keeps no hooks
    assert objective.adapter is not None and objective.adapter.config()["rank"] == 2
    frozen = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    adapter_ids = {id(p) for p in objective.adapter.parameters()}
    aggregator_ids = {id(p) for p in objective.aggregator.parameters() if p.requires_grad}
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    assert trainable == adapter_ids | aggregator_ids

    objective.train()
    assert not objective.encoder.training and objective.adapter.training  # frozen encoder: eval mode
    train_loader = loader(dataset(data, every, cfg, train=True, features=CLIN, encoder=encoder), cfg, train=True,
                          seed=0)
    batch = next(iter(train_loader))
    assert batch["x"].ndim == 5 and batch["x"].shape[1] == 2  # image bags of cells_per_bag cells
    objective.training_step(batch).loss.backward()
    assert all(p.grad is None for p in objective.encoder.parameters())  # frozen: no gradient at all
    assert all(p.grad is not None for p in objective.adapter.parameters())  # reached through the encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.aggregator.parameters())
    objective.zero_grad(set_to_none=True)

    before_agg = {k: v.clone() for k, v in objective.aggregator.state_dict().items()}
    trainer = Trainer(objective, replace(TrainerConfig.from_config(cfg), epochs=2, keep_last=0, device="cpu"),
                      tmp_path / "fit")
    trainer.fit(train_loader, None)
    assert trainer.step >= 4
    after = objective.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # bit-identical encoder
    lora_b = [p for n, p in objective.adapter.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the zero-initialised up-projections trained
    assert any(not torch.equal(v, objective.aggregator.state_dict()[k]) for k, v in before_agg.items())
    counts = objective.parameter_counts()
    n_adapter = sum(p.numel() for p in objective.adapter.parameters())
    n_agg = sum(p.numel() for p in objective.aggregator.parameters() if p.requires_grad)
    assert counts["trainable_params"] == n_adapter + n_agg and counts["trainable_share"] < 0.2
    assert counts["adapter"].startswith("lora(rank=2")

    # the encoder is referenced by its file, not stored: neither in the objective's state nor as "backbone"
    assert not any(k.startswith("encoder.") for k in objective.state_dict())
    assert any(k.startswith("adapter.") for k in objective.state_dict())
    assert objective.export_backbone() is None
    record = objective.checkpoint_extras()["adapter"]
    assert record["init"] == str(vit_file.resolve()) and record["adapter_params"] == n_adapter


def test_a_random_timm_encoder_is_stored_with_the_adapter(bags: Path, vit_file: Path) -> None:
    cohort = read_cohort(bags)
    encoder = replace(load_encoder(vit_file, 32), kind="timm")  # as a timm name builds it: no file to reference
    data = BagData.of(cohort, embed_cohort(cohort, encoder, None, progress=False), ())
    objective = build_objective(_cfg(), data, np.arange(len(cohort)), "mean", (), encoder)
    assert objective.checkpoint_extras()["adapter"]["init"] is None  # no file to reference: the weights travel
    stored = objective.export_backbone()
    assert stored is not None and all(torch.equal(stored[k], v) for k, v in encoder.model.state_dict().items())


def test_adapter_run_keeps_the_small_adapter_and_reloads_its_predictions(
    bags: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vit = _vit_file(tmp_path / "vit_tiny.pt")
    run = train_mil(tmp_path / "runs", overrides={
        "data.bags": str(bags), "encoder.model": str(vit), "encoder.img_size": 32, "encoder.finetune": True,
        "encoder.adapter": "lora", "encoder.adapter_kwargs.lora.rank": 2, "encoder.cells_per_bag": 2,
        "train.epochs": 2, "train.progress": False, "data.batch_size": 4, "data.passes_per_epoch": 1,
        "model.hidden": 16, "model.aggregator": "abmil"})
    assert "trainable parameters:" in capsys.readouterr().out
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["adapter"]["config"] == {"name": "lora", "rank": 2, "alpha": 16.0, "targets": ["qkv", "proj"],
                                          "dropout": 0.0}
    assert state["backbone"] is None and not any(k.startswith("encoder.") for k in state["objective"])
    assert (run / "best.pt").stat().st_size < vit.stat().st_size / 4  # the frozen ViT is not in the run
    history = pd.read_csv(run / "history.csv")
    assert (history["trainable_share"] < 0.2).all() and history["adapter"].str.startswith("lora(").all()

    assert main(["mil", "evaluate", str(run), "--data", str(bags), "--no-progress", "--gallery", "1"]) == 0
    evaluated = pd.read_csv(run / f"eval-{bags.name}" / "predictions.csv").set_index("patient")
    val = pd.read_csv(run / "val_predictions.csv").set_index("patient")
    assert np.allclose(evaluated.loc[val.index, "probability"], val["probability"], atol=2e-6)
    # training cached the frozen encoder's embeddings once; the adapted encoder embeds anew and caches nothing
    assert len(list((tmp_path / "runs" / ".mil-cache").glob("cells-*.pt"))) == 1

    _vit_file(vit, seed=1)  # the referenced encoder file now holds other weights
    assert main(["mil", "predict", str(run), "--data", str(bags), "--no-progress", "--gallery", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SHA-256 differs" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapter", "lora"], "--adapter lora .* expected it with --finetune-encoder"),
        (["--encoder", "resnet10t", "--finetune-encoder", "--adapter", "lora"], "needs a ViT encoder; resnet10t"),
        (["--finetune-encoder", "--adapter", "prompt", "--lora-rank", "4"], "--lora-rank applies to --adapter lora"),
        (["--finetune-encoder", "--adapter", "lora", "--lora-rank", "0"], "LoRA rank 0"),
        (["--finetune-encoder", "--adapter", "prompt"], "prompt tokens 10: expected a whole number from 1 to 4"),
        (["--finetune-encoder", "--adapter", "nope"], "nope"),
    ],
)
def test_bad_adapter_input_is_one_line_and_exit_2(
    bags: Path, vit_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    encoder = [] if "--encoder" in extra else ["--encoder", str(vit_file)]
    assert main(["mil", "train", str(bags), "--img-size", "32", "--out", str(tmp_path / "runs"), "--no-progress",
                 *encoder, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("mil-*"))  # nothing left behind
