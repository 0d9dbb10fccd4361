"""Batched multi-crop: shapes, seeding, per-sample parameters, the maths against torchvision, DINO integration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from leukolab.data.multicrop import (
    BatchedMultiCrop,
    MultiCropTransform,
    MultiCropViews,
    _brightness,
    _contrast,
    _gaussian_blur,
    _hue,
    _saturation,
)
from leukolab.data.transforms import MEAN, STD
from leukolab.errors import LeukolabError
from leukolab.objectives.dino import DINOObjective
from leukolab.training.loop import Trainer, TrainerConfig

_M = torch.tensor(MEAN).view(1, 3, 1, 1)
_S = torch.tensor(STD).view(1, 3, 1, 1)


def _images(b: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in [0, 1] (so crops of different places differ)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(size, size), mode="bilinear", align_corners=False)


def _crops(*args: int, **kw: int) -> BatchedMultiCrop:
    """Batched multi-crop of ``MultiCropViews(*args, **kw)``."""
    return BatchedMultiCrop(MultiCropViews(*args, **kw))


def _plain(**kw: int) -> BatchedMultiCrop:
    """Every random step off: whole-image crops, no flips, no colour, no blur, no solarisation."""
    views = MultiCropViews(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), jitter=0.0, **kw)
    return BatchedMultiCrop(views, flips=False, blur=False, solarize=False)


def test_views_have_the_multicrop_shapes_dtype_and_normalisation() -> None:
    x = _images(5, 32)
    views = _crops(16, 8, n_local=3)(x)
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    grey = torch.full((2, 3, 16, 16), 0.25)  # a flat image stays flat: its view is exactly (0.25 - mean) / std
    out = _plain(global_size=8, local_size=8, n_local=1)(grey)
    for v in out:
        torch.testing.assert_close(v, ((0.25 - _M) / _S).expand_as(v))
    torch.manual_seed(3)
    from_uint8 = _crops(16, 8, n_local=1)((x * 255).round().to(torch.uint8))
    torch.manual_seed(3)
    from_float = _crops(16, 8, n_local=1)((x * 255).round() / 255)
    for a, b in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(a, b)


def test_without_random_steps_a_view_is_a_plain_resize_and_normalise() -> None:
    x = _images(4, 32)
    g1, g2, loc = _plain(global_size=16, local_size=8, n_local=1)(x)
    # crops of the whole image: a 2x downscale averages 2 x 2 pixels (antialiased), a 4x one 4 x 4
    torch.testing.assert_close(g1, (F.interpolate(x, size=16, mode="area") - _M) / _S)
    torch.testing.assert_close(g2, g1)
    torch.testing.assert_close(loc, (F.interpolate(x, size=8, mode="area") - _M) / _S)
    same = _plain(global_size=32, local_size=32, n_local=0)(x)[0]
    torch.testing.assert_close(same, (x - _M) / _S)


def test_same_seed_same_views_other_seed_other_views() -> None:
    crops, x = _crops(16, 8, n_local=2), _images(4, 32)
    torch.manual_seed(1)
    a = crops(x)
    torch.manual_seed(1)
    b = crops(x)
    torch.manual_seed(2)
    c = crops(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(not torch.allclose(u, v) for u, v in zip(a, c, strict=True))


def test_parameters_are_drawn_per_sample() -> None:
    x = _images(1, 32).expand(8, -1, -1, -1).contiguous()  # one image, eight times
    torch.manual_seed(0)
    for view in _crops(16, 8, n_local=1)(x):
        flat = view.flatten(1)
        distinct = {tuple(r.tolist()) for r in flat.round(decimals=4)}
        assert len(distinct) == 8  # every copy got its own crop / flip / colour
    boxes = BatchedMultiCrop.crop_boxes(8, 32, 32, (0.1, 1.0))
    assert len({tuple(b.tolist()) for b in boxes}) == 8


def test_crop_boxes_follow_the_random_resized_crop_distribution() -> None:
    torch.manual_seed(0)
    for scale in ((0.4, 1.0), (0.1, 0.4)):
        boxes = BatchedMultiCrop.crop_boxes(4000, 128, 128, scale)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        area = w * h / 128**2
        assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
        assert scale[0] < area.mean() < scale[1] and area.std() > 0.1 * (scale[1] - scale[0])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128 + 1e-4).all()
        aspect = w / h
        assert aspect.min() >= 0.75 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # scale (1, 1) fits only at aspect 1: torchvision's fallback, the whole (square) image
    full = BatchedMultiCrop.crop_boxes(50, 64, 64, (1.0, 1.0))
    torch.testing.assert_close(full, torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(50, 4))


def test_colour_ops_and_blur_match_torchvision_per_sample() -> None:
    x = _images(4, 16, seed=1)
    factors = torch.tensor([0.6, 1.0, 1.3, 1.4])
    hues = torch.tensor([-0.1, 0.03, 0.0, 0.1])
    sigmas = torch.tensor([0.1, 0.3, 0.57, 1.0])
    for i in range(4):
        img, f = x[i], float(factors[i])
        torch.testing.assert_close(_brightness(x, factors)[i], TF.adjust_brightness(img, f))
        torch.testing.assert_close(_contrast(x, factors)[i], TF.adjust_contrast(img, f))
        torch.testing.assert_close(_saturation(x, factors)[i], TF.adjust_saturation(img, f))
        torch.testing.assert_close(_hue(x, hues)[i], TF.adjust_hue(img, float(hues[i])), atol=2e-5, rtol=0)
        s = float(sigmas[i])
        torch.testing.assert_close(_gaussian_blur(x, sigmas, 7)[i], TF.gaussian_blur(img, [7, 7], [s, s]))


def test_batched_views_look_like_per_image_views() -> None:
    """One image through both transforms: the view statistics agree (the same augmentation distribution).

    The spread of the per-view channel means is the colour jitter's signature (without jitter it is ~0.2 lower).
    """
    img = (_images(1, 64, seed=2)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(img)
    n, threads = 256, torch.get_num_threads()
    torch.manual_seed(0)
    per_image = MultiCropTransform(MultiCropViews(32, 16, n_local=1))
    torch.set_num_threads(1)  # tiny per-image ops: threads only add overhead
    try:
        ref = [torch.stack(vs) for vs in zip(*(per_image(pil) for _ in range(n)), strict=True)]
    finally:
        torch.set_num_threads(threads)
    batched = _crops(32, 16, n_local=1)
    out = batched(batched.base_transform()(pil).unsqueeze(0).expand(n, -1, -1, -1))
    for a, b in zip(ref, out, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b.mean((0, 2, 3)), a.mean((0, 2, 3)), atol=0.1, rtol=0)  # channel means
        torch.testing.assert_close(b.mean((2, 3)).std(0), a.mean((2, 3)).std(0), atol=0.06, rtol=0)  # colour spread
        torch.testing.assert_close(b.std((2, 3)).mean(0), a.std((2, 3)).mean(0), atol=0.06, rtol=0)  # contrast


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(LeukolabError, match=r"shape \(3, 8, 8\); expected \(B, 3, H, W\)"):
        BatchedMultiCrop()(torch.rand(3, 8, 8))
    with pytest.raises(LeukolabError, match=r"local crop scale \[0\.5, 0\.1\] is invalid"):
        MultiCropViews(local_scale=(0.5, 0.1))


def test_both_transforms_of_one_options_object_make_the_same_views() -> None:
    views = MultiCropViews(24, 8, n_local=3, global_scale=[0.5, 1], local_scale=(0.2, 0.5), jitter=0)
    assert views.global_scale == (0.5, 1.0) and isinstance(views.global_scale[1], float)  # normalised once
    per_image, batched = MultiCropTransform(views), BatchedMultiCrop(views)
    assert per_image.options is views and batched.options is views
    assert per_image.n_views == batched.n_views == views.n_views == 5
    pil = Image.new("RGB", (40, 33), (180, 90, 140))
    torch.manual_seed(0)
    one = per_image(pil)
    many = batched(batched.base_transform()(pil).unsqueeze(0).expand(2, -1, -1, -1))
    assert [tuple(v.shape) for v in one] == [(3, 24, 24)] * 2 + [(3, 8, 8)] * 3
    assert [tuple(v.shape[1:]) for v in many] == [tuple(v.shape) for v in one] and all(len(v) == 2 for v in many)
    with pytest.raises(LeukolabError, match="local crops -1 must be >= 0"):
        MultiCropViews(n_local=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_views_match_cpu_views_for_the_same_seed() -> None:
    crops, x = _crops(16, 8, n_local=2), _images(4, 32)
    torch.manual_seed(5)
    cpu = crops(x)
    torch.manual_seed(5)
    gpu = crops(x.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


def _dino() -> DINOObjective:
    torch.manual_seed(0)
    return DINOObjective("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 2}, out_dim=64, hidden_dim=32,
                         bottleneck_dim=16, local_crops=2, local_size=16, batched_crops=True)


def test_dino_with_batched_crops_trains_on_square_image_batches(tmp_path: Path) -> None:
    dino = _dino()
    assert dino.multicrop is not None and not any(k.startswith("multicrop") for k in dino.state_dict())
    train_tf, val_tf = dino.transforms()
    pil = Image.new("RGB", (50, 47), (200, 120, 160))
    image = train_tf(pil)
    assert torch.equal(val_tf(pil), image)  # no randomness in the dataset: the views are drawn per batch
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    batch = (_images(4, 64), torch.full((4,), -1))
    out = dino.training_step(batch)
    assert math.isfinite(float(out.loss.detach())) and out.batch_size == 4
    out.loss.backward()
    assert dino.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    trainer = Trainer(dino, TrainerConfig(progress=False, device="cpu"), tmp_path)
    first, second = trainer.validate([batch]), trainer.validate([batch])  # the trainer re-seeds: the same views
    assert first == second and first["val_loss"] > 0
