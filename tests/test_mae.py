"""MAE: exact masking, a falling loss, visible patches learnt, timm-named export, the reconstruction figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from leukolab.data.dataset import ImageDataset
from leukolab.data.readers import list_images
from leukolab.data.synthetic import make_pool
from leukolab.data.transforms import eval_transform
from leukolab.errors import LeukolabError
from leukolab.evaluation.reconstructions import ReconstructionFigure, reconstruct
from leukolab.models.backbones import create_backbone
from leukolab.models.mae import MAEConfig, patchify, unpatchify
from leukolab.objectives.mae import MAEObjective
from leukolab.registry import PRETRAIN_METHODS
from leukolab.training.loop import Trainer, TrainerConfig

TINY = {"patch_size": 8, "depth": 2}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pool(tmp_path_factory.mktemp("mae") / "pool", 24, size=32, seed=0, progress=False)


def _batch(pool: Path, n: int, size: int = 32) -> torch.Tensor:
    ds = ImageDataset(list_images(pool)[:n], None, eval_transform(size))
    return torch.stack([ds[i][0] for i in range(n)])


@pytest.mark.parametrize(("ratio", "kept"), [(0.75, 4), (0.5, 8), (0.25, 12), (0.6, 6), (0.9, 2)])
def test_masking_keeps_exactly_the_requested_share(ratio: float, kept: int) -> None:
    torch.manual_seed(0)
    mae = MAEObjective("vit_tiny_patch16_224", 32, {**TINY, "reg_tokens": 2}, mask_ratio=ratio).model
    assert mae.num_patches == 16 and mae.num_keep == kept == round(16 * (1 - ratio))
    ids_keep, ids_restore, mask = mae.random_masking(5, torch.device("cpu"))
    assert ids_keep.shape == (5, kept)
    assert torch.equal(mask.sum(1), torch.full((5,), 16.0 - kept))
    for row in range(5):  # the kept patches are exactly the unmasked ones, each once
        assert sorted(ids_keep[row].tolist()) == torch.nonzero(mask[row] == 0).flatten().tolist()
    assert torch.equal(torch.gather(ids_restore.argsort(1), 1, ids_restore), torch.arange(16).expand(5, -1))
    # the encoder sees only the visible patches plus the class and register tokens
    assert mae.forward_encoder(torch.randn(5, 3, 32, 32), ids_keep).shape == (5, 1 + 2 + kept, 192)


def test_patchify_roundtrip_and_order() -> None:
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 192) and torch.equal(unpatchify(p, 8, (4, 4)), x)
    # patch 1 is the second one of the first row, as in timm's patch embedding
    assert torch.equal(p[0, 1].reshape(8, 8, 3).permute(2, 0, 1), x[0, :, 0:8, 8:16])


def test_bad_mask_ratio_and_non_vit_are_refused() -> None:
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(LeukolabError, match="outside"):
            MAEConfig(mask_ratio=ratio)
        with pytest.raises(LeukolabError, match="outside"):  # the objective checks it through its config
            PRETRAIN_METHODS.build("mae", backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY,
                                   mask_ratio=ratio)
    with pytest.raises(LeukolabError, match="Vision Transformer"):
        MAEObjective("resnet10t", 32)


@pytest.mark.slow
def test_loss_falls_on_a_tiny_pool(pool: Path) -> None:
    torch.manual_seed(0)
    x = _batch(pool, 16)
    mae = MAEObjective("vit_tiny_patch16_224", 32, TINY, mask_ratio=0.5)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], 1e-3)
    losses = []
    for _ in range(20):
        out = mae.training_step((x, None))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


@pytest.mark.slow
def test_visible_patches_are_reconstructed_after_overfitting_one_batch(pool: Path) -> None:
    torch.manual_seed(0)
    x = _batch(pool, 2, size=16)
    mae = MAEObjective("vit_tiny_patch16_224", 16, {"patch_size": 8, "depth": 1}, mask_ratio=0.25,
                       norm_pix_loss=False, visible_loss_weight=10.0)
    opt = torch.optim.Adam([p for p in mae.parameters() if p.requires_grad], 1e-3)
    for _ in range(150):
        loss, logs = mae.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    pred, mask = mae.model(x)
    err = ((pred - patchify(x, 8)) ** 2).mean(-1)
    visible_mse = (err * (1 - mask)).sum() / (1 - mask).sum()
    assert visible_mse.item() < 0.05 * x.var().item(), logs
    # the figure's reconstruction pastes the visible patches back unchanged
    original, masked, recon = reconstruct(mae.model, x, seed=3)
    _, mask = mae.model(x, torch.Generator().manual_seed(3))  # the same masks
    keep = unpatchify((1 - mask)[..., None].expand(-1, -1, 192), 8, (2, 2)).bool()
    assert torch.allclose(recon[keep], original[keep], atol=1e-6)
    assert not torch.allclose(masked, original)


def test_export_is_the_encoder_in_timm_naming() -> None:
    kw = {**TINY, "reg_tokens": 4}
    mae = MAEObjective("vit_tiny_patch16_224", 32, kw)
    sd = mae.export_backbone()
    assert set(sd) == set(create_backbone("vit_tiny_patch16_224", 32, **kw).state_dict())
    timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw).load_state_dict(sd)
    extras = mae.checkpoint_extras()
    assert extras["task"] == "pretrain-mae" and extras["registers"] == 4 and extras["backbone_kwargs"] == kw
    spec = mae.backbone_spec()
    assert (spec.name, spec.kwargs, spec.img_size, spec.patch_size) == ("vit_tiny_patch16_224", kw, 32, 8)


def test_validation_loss_is_repeatable(pool: Path, tmp_path: Path) -> None:
    x = _batch(pool, 8)
    mae = MAEObjective("vit_tiny_patch16_224", 32, TINY)
    trainer = Trainer(mae, TrainerConfig(progress=False, device="cpu"), tmp_path)
    loader = [(x[:4], None), (x[4:], None)]
    a = trainer.validate(loader)
    b = trainer.validate(loader)
    assert a == b and set(a) == {"val_loss"} and a["val_loss"] > 0
    # the same masks every validation, not the same mask for every batch
    first = mae.validation_step(loader[0])
    assert mae.validation_step(loader[0])["loss"] != first["loss"]


@pytest.mark.slow
def test_reconstructions_png_keeps_the_last_epochs(pool: Path, tmp_path: Path) -> None:
    mae = MAEObjective("vit_tiny_patch16_224", 32, TINY)
    figure = ReconstructionFigure(mae.model, _batch(pool, 8))
    for epoch in range(1, 7):
        figure(epoch, tmp_path)
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert [e for e, _ in figure.panels] == [3, 4, 5, 6]
    # three rows (original, masked, reconstruction) of 8 images per epoch
    assert figure.panels[0][1].shape == (3 * (32 + 2), 8 * (32 + 2), 3)
