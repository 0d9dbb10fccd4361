"""``leukolab pretrain --method ae`` (convolutional auto-encoder) and ``leukolab synth tissue`` (normal vs tumour)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from leukolab.checkpoints import load_checkpoint
from leukolab.cli.main import main  # noqa: F401  (registers every command, in the CLI's order)
from leukolab.config import resolve
from leukolab.data.synthetic import TISSUE_CLASSES, make_pool, make_tissue_dataset, render_tissue_patch
from leukolab.data.transforms import eval_transform
from leukolab.errors import LeukolabError
from leukolab.losses.ae_loss import reconstruction_loss
from leukolab.models.backbones import create_backbone
from leukolab.objectives.ae import AEObjective
from leukolab.pipelines import classify
from leukolab.pipelines.pretrain import method_backbone
from test_pretrain_cli import _run_dir, run_cli  # the same CLI helpers as the MAE/DINO tests

TINY_AE = {
    "data": {"img_size": 32, "batch_size": 8, "val_fraction": 0.25},
    "ae": {"decoder_dim": 32, "min_width": 8},
    "train": {"progress": False},
    "optim": {"base_lr": 0.05},
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pool(tmp_path_factory.mktemp("ae") / "pool", 32, size=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "ae.yaml"
    path.write_text(yaml.safe_dump(TINY_AE))
    return path


# ------------------------------------------------------------------------------------------------ auto-encoder
def test_reconstruction_loss_matches_torch() -> None:
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mse, l1 = ((pred - target) ** 2).mean(), (pred - target).abs().mean()
    for kind, expected in (("mse", mse), ("l1", l1), ("l1+mse", mse + l1)):
        loss, logs = reconstruction_loss(pred, target, kind)
        assert torch.allclose(loss, expected) and logs["mse"] == pytest.approx(float(mse))
    with pytest.raises(LeukolabError, match="unknown reconstruction loss"):
        reconstruction_loss(pred, target, "l3")


def test_ae_loss_falls_on_a_tiny_pool(pool: Path) -> None:
    torch.manual_seed(0)
    tf = eval_transform(32)
    imgs = torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(pool.glob("*.png"))])
    ae = AEObjective("resnet10t", 32, decoder_dim=32, min_width=8)
    assert ae.model(imgs[:2]).shape == (2, 3, 32, 32)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    ae.train()
    losses = []
    for step in range(12):  # three epochs of four batches of 8
        loss = ae.training_step(imgs[(step % 4) * 8 : (step % 4) * 8 + 8]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:2]), losses
    ae.eval()
    with torch.no_grad():
        assert float(ae.loss(imgs)[0]) < 0.6 * losses[0]  # the eval-mode network (running batch-norm stats) too


def test_default_backbone_follows_the_method() -> None:
    for method, expected in (("ae", "resnet18"), ("mae", "vit_tiny_patch16_224"), ("dino", "vit_tiny_patch16_224")):
        assert method_backbone(resolve("pretrain", None, {"method": method})) == expected
    assert method_backbone(resolve("pretrain", None, {"method": "ae", "model.backbone": "resnet34"})) == "resnet34"


def test_ae_encoder_loads_as_classifier_init(tmp_path: Path) -> None:
    ae = AEObjective("resnet10t", 32, decoder_dim=16, min_width=8)
    with torch.no_grad():
        for p in ae.model.encoder.parameters():
            p.add_(torch.randn_like(p))  # weights no random init would give
    torch.save({"backbone": ae.export_backbone(), "backbone_spec": ae.backbone_spec().to_dict(),
                **ae.checkpoint_extras()}, tmp_path / "ae.pt")
    cfg = resolve("train", None, {"data.path": str(tmp_path), "data.img_size": 32, "model.backbone": "resnet10t",
                                  "model.init": str(tmp_path / "ae.pt")})
    classify.adopt_init_architecture(cfg)
    model = classify.build_model(cfg, 2)
    got, want = model.backbone.state_dict(), ae.model.encoder.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.slow
def test_ae_run_encoder_loads_into_train_init(pool: Path, tiny_yaml: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["pretrain", str(pool), "--method", "ae", "--config", str(tiny_yaml), "--epochs", "1",
                              "--backbone", "resnet10t", "--out", str(tmp_path / "pt"), "--keep-last", "0"], capsys)
    assert code == 0, err
    run = _run_dir(out)
    for name in ("config.yaml", "history.csv", "best.pt", "last.pt", "reconstructions.png"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["task"] == "pretrain-ae" and ckpt["backbone_spec"]["name"] == "resnet10t"
    encoder = {k.removeprefix("model.encoder."): v for k, v in ckpt["objective"].items()
               if k.startswith("model.encoder.")}
    assert set(ckpt["backbone"]) == set(create_backbone("resnet10t", 32).state_dict()) == set(encoder)
    assert all(torch.equal(encoder[k], v) for k, v in ckpt["backbone"].items())

    # `train --init RUN` with no other flag; a frozen backbone keeps exactly the AE encoder's weights
    tissue = make_tissue_dataset(tmp_path / "tissue", 12, size=32, seed=0, progress=False)
    code, out, err = run_cli(["train", str(tissue), "--backbone", "resnet10t", "--init", str(run), "--img-size", "32",
                              "--epochs", "1", "--batch-size", "8", "--freeze-backbone", "--out",
                              str(tmp_path / "cls")], capsys)
    assert code == 0, err
    cls = load_checkpoint(next((tmp_path / "cls").iterdir()) / "last.pt")
    assert set(cls["backbone"]) == set(ckpt["backbone"])
    assert all(torch.equal(cls["backbone"][k], v) for k, v in ckpt["backbone"].items())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--backbone", "vit_tiny_patch16"], "expected a CNN backbone such as resnet18"),
        (["--registers", "2"], "cannot take register tokens"),
        (["--config", "{bad}"], "ae.loss 'l3' is unknown"),
    ],
)
def test_bad_ae_input_gives_one_line_error_and_exit_2(args: list[str], expected: str, pool: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ae": {"loss": "l3"}}))
    args = [a.replace("{bad}", str(bad)) for a in args]
    code, _, err = run_cli(["pretrain", str(pool), "--method", "ae", *args, "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")
    assert expected in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ synth tissue
def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_tissue_is_deterministic_and_two_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--n", "9", "--size", "24", "--seed", "3", "--no-progress"]
    assert run_cli(["synth", "tissue", str(tmp_path / "a"), *args], capsys)[0] == 0
    assert run_cli(["synth", "tissue", str(tmp_path / "b"), *args], capsys)[0] == 0
    a = _digests(tmp_path / "a")
    assert a == _digests(tmp_path / "b")
    assert sum(k.startswith("normal/") for k in a) == 5 and sum(k.startswith("tumour/") for k in a) == 4
    assert (tmp_path / "a" / "metadata.csv").read_text().splitlines()[0] == "path,label"
    more = make_tissue_dataset(tmp_path / "more", 12, size=24, seed=3, progress=False)  # more images: same first ones
    assert {k: v for k, v in _digests(more).items() if k in a and k != "metadata.csv"} == {
        k: v for k, v in a.items() if k != "metadata.csv"}
    other = make_tissue_dataset(tmp_path / "other", 9, size=24, seed=4, progress=False)
    assert _digests(other)["normal/normal_00000.png"] != a["normal/normal_00000.png"]
    code, _, err = run_cli(["synth", "tissue", str(tmp_path / "a"), *args], capsys)  # never overwritten
    assert code == 2 and err.startswith("error:")


def test_tissue_classes_differ_but_overlap() -> None:
    """The dark (nuclear) pixel share separates normal from tumour well above chance but not perfectly."""
    dark = {label: np.array([(render_tissue_patch(48, np.random.default_rng([0, k, i]), label).mean(axis=2) < 110)
                             .mean() for i in range(40)]) for k, label in enumerate(TISSUE_CLASSES)}
    normal, tumour = dark["normal"], dark["tumour"]
    auc = (tumour[:, None] > normal[None, :]).mean() + 0.5 * (tumour[:, None] == normal[None, :]).mean()
    assert 0.75 < auc < 1.0, auc
    with pytest.raises(LeukolabError, match="unknown tissue label"):
        render_tissue_patch(32, np.random.default_rng(0), "benign")
    with pytest.raises(LeukolabError, match="difficulty"):
        render_tissue_patch(32, np.random.default_rng(0), "tumour", difficulty=2.0)
    # unlabelled patches (pretraining pools) ignore difficulty
    plain = render_tissue_patch(32, np.random.default_rng(1))
    assert np.array_equal(plain, render_tissue_patch(32, np.random.default_rng(1), None, difficulty=0.9))
