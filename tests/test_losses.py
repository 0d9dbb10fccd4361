"""The loss math, pinned to reference formulas written out here from the papers and their code.

* MAE (He et al. 2022; ``forward_loss`` and ``patchify`` of facebookresearch/mae ``models_mae.py``):
  per-patch normalised pixels, squared error averaged per patch, then over the masked patches.
* DINO (Caron et al. 2021; Algorithm 1 and ``DINOLoss`` of facebookresearch/dino ``main_dino.py``):
  centred and sharpened teacher targets, student log-probabilities, every (global teacher crop,
  other student crop) pair, and the centre EMA.
* KoLeo (DINOv2 ``KoLeoLoss``): minus the mean log distance to the nearest other row.

Each reference is an independent implementation (einsum patchify, explicit per-sample loops) on
fixed tensors, compared with the library to ~1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from leukolab.losses import DINOLoss, koleo_loss, mae_loss
from leukolab.models.ema import cosine_momentum
from leukolab.models.mae import patchify
from leukolab.objectives.dino import DINOObjective
from leukolab.objectives.mae import MAEObjective


# --------------------------------------------------------------------------- MAE
def ref_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """facebookresearch/mae ``MaskedAutoencoderViT.patchify``."""
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def ref_mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """facebookresearch/mae ``MaskedAutoencoderViT.forward_loss``, written per sample and per patch."""
    target = ref_patchify(imgs, p)
    total, n_masked = 0.0, 0.0
    for b in range(target.shape[0]):
        for i in range(target.shape[1]):
            t = target[b, i]
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(t.var(unbiased=True).item() + 1.0e-6)
            total += float(mask[b, i]) * ((pred[b, i] - t) ** 2).mean().item()
            n_masked += float(mask[b, i])
    return torch.tensor(total / n_masked)


def _fixed_mae_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    pred = torch.randn(3, 4, 8 * 8 * 3, generator=g)
    mask = (torch.rand(3, 4, generator=g) < 0.5).float()
    mask[:, 0] = 1.0  # every sample has a masked patch ...
    mask[:, 1] = 0.0  # ... and a visible one
    return imgs, pred, mask


def test_patchify_is_the_reference_layout() -> None:
    imgs = torch.randn(2, 3, 32, 24)
    assert torch.equal(patchify(imgs, 8), ref_patchify(imgs, 8))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_the_paper_formula(norm_pix: bool) -> None:
    imgs, pred, mask = _fixed_mae_tensors()
    loss, logs = mae_loss(pred, patchify(imgs, 8), mask, norm_pix=norm_pix)
    assert logs == {}
    assert loss.item() == pytest.approx(ref_mae_loss(imgs, pred, mask, 8, norm_pix).item(), abs=1e-6, rel=1e-6)
    # only the masked patches count: changing a visible patch's prediction changes nothing
    pred2 = pred.clone()
    pred2[:, 1] += 5.0
    assert torch.equal(mae_loss(pred2, patchify(imgs, 8), mask, norm_pix=norm_pix)[0], loss)


def test_mae_visible_weight_adds_the_visible_patch_error() -> None:
    imgs, pred, mask = _fixed_mae_tensors(1)
    loss, logs = mae_loss(pred, patchify(imgs, 8), mask, norm_pix=True, visible_weight=0.5)
    masked = ref_mae_loss(imgs, pred, mask, 8, True).item()
    visible = ref_mae_loss(imgs, pred, 1 - mask, 8, True).item()
    assert logs["masked_mse"] == pytest.approx(masked, abs=1e-6)
    assert logs["visible_mse"] == pytest.approx(visible, abs=1e-6)
    assert loss.item() == pytest.approx(masked + 0.5 * visible, abs=1e-6)


def test_mae_objective_loss_is_the_reference_loss_of_its_own_predictions() -> None:
    torch.manual_seed(0)
    mae = MAEObjective("vit_tiny_patch16_224", 16, {"patch_size": 8, "depth": 1}, mask_ratio=0.5)
    imgs = torch.randn(2, 3, 16, 16)
    loss, _ = mae.loss(imgs, torch.Generator().manual_seed(3))
    pred, mask = mae.model(imgs, torch.Generator().manual_seed(3))  # the same masks
    assert mask.sum().item() == 2 * 2  # half of each sample's 4 patches
    assert loss.item() == pytest.approx(ref_mae_loss(imgs, pred.detach(), mask, 8, True).item(), abs=1e-6)


# --------------------------------------------------------------------------- DINO
def ref_dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int,
                  student_temp: float, teacher_temp: float) -> float:
    """facebookresearch/dino ``DINOLoss.forward`` (two global crops), written per sample."""
    b = teacher.shape[0] // 2
    s = [student[v * b : (v + 1) * b] for v in range(n_crops)]
    t = [teacher[q * b : (q + 1) * b] for q in range(2)]
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            pair = 0.0
            for i in range(b):
                q = torch.exp((t[iq][i] - center[0]) / teacher_temp)
                q = q / q.sum()  # centred, sharpened teacher distribution
                logp = s[v][i] / student_temp - torch.logsumexp(s[v][i] / student_temp, 0)
                pair += float(-(q * logp).sum())
            total += pair / b
            terms += 1
    return total / terms


@pytest.mark.parametrize("n_crops", [2, 4, 6])
def test_dino_loss_matches_the_reference(n_crops: int) -> None:
    g = torch.Generator().manual_seed(n_crops)
    b, k = 5, 16
    student, teacher = torch.randn(n_crops * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(0.3 * torch.randn(1, k, generator=g))
    loss, probs = loss_fn(student, teacher, teacher_temp=0.05)
    expected = ref_dino_loss(student, teacher, loss_fn.center, n_crops, 0.1, 0.05)
    assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-6)
    assert torch.allclose(probs, F.softmax((teacher - loss_fn.center) / 0.05, dim=-1), atol=1e-7)
    # the loss never compares a view with itself: same-view pairs do not enter it
    only_globals, _ = loss_fn(student[: 2 * b], teacher, teacher_temp=0.05)
    swapped = ref_dino_loss(student[: 2 * b], teacher, loss_fn.center, 2, 0.1, 0.05)
    assert only_globals.item() == pytest.approx(swapped, abs=1e-5)


def test_dino_algorithm_1_two_crops_and_centre_ema() -> None:
    """Algorithm 1: ``H(t1, s2)/2 + H(t2, s1)/2``, then ``C <- m C + (1 - m) mean([t1, t2])``."""
    g = torch.Generator().manual_seed(0)
    b, k, m = 4, 8, 0.9
    s1, s2, t1, t2 = (torch.randn(b, k, generator=g) for _ in range(4))
    c = 0.2 * torch.randn(1, k, generator=g)

    def h(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = F.softmax((t - c) / 0.04, dim=1)  # centre + sharpen
        return -(t * F.log_softmax(s / 0.1, dim=1)).sum(dim=1).mean()

    expected = h(t1, s2) / 2 + h(t2, s1) / 2
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=m)
    loss_fn.center.copy_(c)
    loss, _ = loss_fn(torch.cat([s1, s2]), torch.cat([t1, t2]), teacher_temp=0.04)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss_fn.update_center(torch.cat([t1, t2]))
    assert torch.allclose(loss_fn.center, m * c + (1 - m) * torch.cat([t1, t2]).mean(dim=0, keepdim=True), atol=1e-7)
    loss_fn.update_center(torch.cat([t2, t1]))  # the centre keeps averaging, batch after batch
    c2 = m * (m * c + (1 - m) * torch.cat([t1, t2]).mean(0, keepdim=True)) + (1 - m) * torch.cat([t1, t2]).mean(0)
    assert torch.allclose(loss_fn.center, c2, atol=1e-7)


def test_dino_objective_warms_the_teacher_temperature_up_linearly() -> None:
    torch.manual_seed(0)
    dino = DINOObjective("resnet10t", 32, out_dim=16, hidden_dim=8, bottleneck_dim=4, warmup_teacher_temp=0.04,
                         teacher_temp=0.07, teacher_temp_warmup_ratio=0.3)
    for step in (0, 1, 5, 10, 29, 30, 31, 100):
        dino.progress_steps[:] = torch.tensor([step, 100])
        expected = 0.04 + (0.07 - 0.04) * step / 30 if step < 30 else 0.07  # DINO's np.linspace warm-up
        assert dino.current_teacher_temp() == pytest.approx(expected)


def test_cosine_momentum_is_dinos_schedule() -> None:
    """facebookresearch/dino ``cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep)``."""
    base, total = 0.996, 50
    for step in range(total + 1):
        expected = 1 + 0.5 * (base - 1) * (1 + math.cos(math.pi * step / total))
        assert cosine_momentum(step, total, base) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- KoLeo
def test_koleo_matches_the_dinov2_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g)
    xn = F.normalize(x, dim=-1, eps=1e-8)
    expected = 0.0
    for i in range(len(xn)):  # nearest other row by cosine similarity, then its Euclidean distance
        others = [j for j in range(len(xn)) if j != i]
        j = max(others, key=lambda j: float(xn[i] @ xn[j]))
        expected -= math.log(float((xn[i] - xn[j]).norm()) + 1e-8) / len(xn)
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)
    tight = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(spread) < koleo_loss(tight)
