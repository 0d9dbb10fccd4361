"""DINO objective: EMA teacher, centring, schedules, a falling loss, teacher export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import default_collate

from leukolab.data.dataset import ImageDataset
from leukolab.data.multicrop import MultiCropTransform, MultiCropViews
from leukolab.data.readers import list_images
from leukolab.data.synthetic import make_pool
from leukolab.errors import LeukolabError
from leukolab.models.backbones import create_backbone
from leukolab.models.dino import DINOConfig
from leukolab.models.ema import cosine_momentum
from leukolab.objectives.dino import DINOObjective
from leukolab.training.loop import Trainer, TrainerConfig

TINY = {"patch_size": 8, "depth": 2}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> list:
    pool = make_pool(tmp_path_factory.mktemp("dino") / "pool", 8, size=32, seed=0, progress=False)
    torch.manual_seed(0)
    ds = ImageDataset(list_images(pool), None, MultiCropTransform(MultiCropViews(32, 16, n_local=2)))
    return default_collate([ds[i] for i in range(len(ds))])


def _dino(**kw: object) -> DINOObjective:
    torch.manual_seed(0)
    return DINOObjective("vit_tiny_patch16_224", 32, {**TINY, "reg_tokens": 2}, out_dim=128, hidden_dim=64,
                         bottleneck_dim=32, **kw)


def test_multicrop_views(batch: list) -> None:
    views, _ = batch
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2


def test_teacher_is_the_ema_of_the_student_after_a_step(batch: list) -> None:
    dino = _dino()
    student = dict(dino.student.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in dino.teacher.named_parameters())
    assert not any(p.requires_grad for p in dino.teacher.parameters())
    before = {n: p.detach().clone() for n, p in dino.teacher.named_parameters()}
    opt = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], 1e-2)
    dino.training_step(batch).loss.backward()
    opt.step()
    dino.on_train_step_end(1, 10)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 1 / 10) + 1) / 2
    assert cosine_momentum(1, 10, 0.996) == pytest.approx(m)
    changed = 0
    for n, p in dino.teacher.named_parameters():
        expected = m * before[n] + (1 - m) * student[n].detach()
        assert torch.allclose(p, expected, atol=1e-7, rtol=1e-6), n
        changed += not torch.equal(p, before[n])
    assert changed > 0
    assert cosine_momentum(0, 10, 0.996) == pytest.approx(0.996) and cosine_momentum(10, 10, 0.996) == 1.0


def test_centre_is_an_ema_of_the_teacher_outputs(batch: list, tmp_path: Path) -> None:
    dino = _dino(center_momentum=0.9)
    center = dino.criterion.center
    views, _ = batch
    with torch.no_grad():
        _, t_out = dino.teacher(views[:2])
    assert torch.count_nonzero(center) == 0
    dino.training_step(batch)
    assert torch.allclose(center, 0.1 * t_out.mean(0, keepdim=True), atol=1e-6)
    first = center.clone()
    dino.training_step(batch)
    assert torch.allclose(center, 0.9 * first + 0.1 * t_out.mean(0, keepdim=True), atol=1e-6)
    # validation leaves the centre alone
    Trainer(dino, TrainerConfig(progress=False, device="cpu"), tmp_path).validate([batch])
    assert torch.allclose(dino.criterion.center, 0.9 * first + 0.1 * t_out.mean(0, keepdim=True), atol=1e-6)


def test_teacher_temperature_warms_up_and_prototypes_freeze() -> None:
    dino = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup_ratio=0.5,
                 freeze_last_layer_ratio=0.2)
    assert dino.current_teacher_temp() == pytest.approx(0.04) and dino.prototypes_frozen()
    dino.progress_steps[:] = torch.tensor([2, 10])
    assert dino.current_teacher_temp() == pytest.approx(0.04 + 0.03 * 2 / 5) and not dino.prototypes_frozen()
    dino.progress_steps[:] = torch.tensor([7, 10])
    assert dino.current_teacher_temp() == pytest.approx(0.07)


@pytest.mark.slow
def test_loss_falls_over_a_few_steps(batch: list) -> None:
    dino = _dino(koleo_weight=0.1)
    opt = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], 1e-3)
    losses = []
    for step in range(1, 9):
        out = dino.training_step(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        dino.on_train_step_end(step, 100)
        losses.append(out.logs["dino_loss"])
        assert math.isfinite(out.logs["koleo"])
    assert losses[-1] < losses[0], losses


def test_validation_is_repeatable_and_does_not_touch_the_global_rng(batch: list, tmp_path: Path) -> None:
    dino = _dino()
    trainer = Trainer(dino, TrainerConfig(progress=False, device="cpu"), tmp_path)

    class RandomViews:  # a loader whose views are drawn from the global generator, like multi-crop
        def __iter__(self):
            views, y = batch
            yield [v + 0.1 * torch.randn_like(v) for v in views], y

    state = torch.get_rng_state()
    a = trainer.validate(RandomViews())
    b = trainer.validate(RandomViews())
    assert a == b and set(a) == {"val_loss", "val_teacher_entropy"} and a["val_loss"] > 0
    assert torch.equal(state, torch.get_rng_state())


def test_options_are_checked_once_in_their_config() -> None:
    with pytest.raises(LeukolabError, match=r"teacher momentum 1\.5"):
        DINOConfig(momentum=1.5)
    with pytest.raises(LeukolabError, match="local crop size 12 is not a multiple"):
        _dino(local_size=12)
    with pytest.raises(LeukolabError, match="local crops -1 must be >= 0"):
        _dino(local_crops=-1).transforms()


def test_export_is_the_teacher_backbone_in_timm_naming(batch: list) -> None:
    dino = _dino()
    dino.training_step(batch).loss.backward()
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(1.0)
    sd = dino.export_backbone()
    kw = {**TINY, "reg_tokens": 2}
    assert set(sd) == set(create_backbone("vit_tiny_patch16_224", 32, **kw).state_dict())
    teacher = dino.teacher.backbone.state_dict()
    assert all(torch.equal(sd[k], teacher[k]) for k in sd)
    assert not torch.equal(sd["cls_token"], dino.student.backbone.cls_token)
    timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw).load_state_dict(sd)
    assert dino.checkpoint_extras()["task"] == "pretrain-dino"
    assert dino.backbone_spec().kwargs == kw and "dynamic_img_size" not in dino.backbone_spec().kwargs


def test_convnet_backbone_works_without_registers(batch: list) -> None:
    torch.manual_seed(0)
    dino = DINOObjective("resnet10t", 32, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    out = dino.training_step(batch)
    assert math.isfinite(out.loss.item())
