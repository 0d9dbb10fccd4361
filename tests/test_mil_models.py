"""MIL aggregators: attention weights, padding, and learning a bag label decided by one planted cell."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from leukolab.errors import LeukolabError
from leukolab.models.mil import build_aggregator, masked_softmax
from leukolab.registry import AGGREGATORS

NAMES = AGGREGATORS.names()


def _batch(seed: int = 0, d: int = 8, c: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, d, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    return x, mask, torch.randn(3, c, generator=g)


def test_registry_lists_every_aggregator() -> None:
    assert set(NAMES) == {"abmil", "clinical", "max", "mean", "moe", "transformer", "xattn"}
    with pytest.raises(LeukolabError, match="unknown aggregator 'nope'"):
        build_aggregator("nope", 8)
    with pytest.raises(LeukolabError, match="aggregator 'moe' needs clinical features"):
        build_aggregator("moe", 8, 0)


def test_masked_softmax_is_zero_on_padding() -> None:
    w = masked_softmax(torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[True, True, False]]))
    assert w[0, 2] == 0 and torch.allclose(w[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), 0))


@pytest.mark.parametrize("name", NAMES)
def test_attention_is_a_distribution_over_real_cells(name: str) -> None:
    torch.manual_seed(0)
    model = build_aggregator(name, 8, 3, hidden=16).eval()
    x, mask, clinical = _batch()
    out = model(x, mask, clinical)
    assert out.logits.shape == (3, 2)
    assert (out.attention >= 0).all()
    assert torch.allclose(out.attention.sum(-1), torch.ones(3), atol=1e-5)
    assert (out.attention[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_the_prediction(name: str) -> None:
    torch.manual_seed(0)
    model = build_aggregator(name, 8, 3, hidden=16).eval()
    x, mask, clinical = _batch()
    out = model(x, mask, clinical)
    # five more padded slots holding huge garbage
    xp = torch.cat([x, 1e3 * torch.randn(3, 5, 8)], 1)
    xp[:, :10][~mask] = 1e3
    mp = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    padded = model(xp, mp, clinical)
    assert torch.allclose(padded.logits, out.logits, atol=1e-5)
    assert torch.allclose(padded.attention[:, :10], out.attention, atol=1e-6)
    assert (padded.attention[:, 10:] == 0).all()
    # and a bag alone gives what it gives in the padded batch
    alone = model(x[2:3, :2], mask[2:3, :2], clinical[2:3])
    assert torch.allclose(alone.logits, out.logits[2:3], atol=1e-5)


def _planted(n_bags: int, seed: int, d: int = 4, n: int = 32) -> tuple[torch.Tensor, ...]:
    """Bags of 21-32 noise cells; a positive bag holds one planted cell (feature 0 = +4) at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_bags, n, d, generator=g)
    sizes = torch.randint(2 * n // 3, n + 1, (n_bags,), generator=g)
    mask = torch.arange(n)[None] < sizes[:, None]
    y = torch.arange(n_bags) % 2
    where = (torch.rand(n_bags, generator=g) * sizes).long()
    x[y == 1, where[y == 1], 0] = 4.0
    x[~mask] = 0
    return x, mask, y, where


def _fit(name: str, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_aggregator(name, x.shape[-1], 0, hidden=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x, mask).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_attention_mil_finds_the_planted_cell_and_beats_mean_pooling() -> None:
    torch.set_num_threads(1)
    x, mask, y, _ = _planted(128, seed=0)
    xt, mt, yt, where = _planted(128, seed=1)
    accuracy = {}
    for name in ("abmil", "mean"):
        model = _fit(name, x, mask, y)
        with torch.no_grad():
            out = model(xt, mt)
        accuracy[name] = (out.logits.argmax(1) == yt).float().mean().item()
        if name == "abmil":
            top = out.attention.argmax(1)
            assert (top[yt == 1] == where[yt == 1]).float().mean() > 0.9  # the top weight is on the planted cell
    assert accuracy["abmil"] > 0.9
    assert accuracy["abmil"] > accuracy["mean"] + 0.15


@pytest.mark.parametrize("name", ["mean", "abmil", "transformer", "xattn"])
def test_clinical_warm_start_predicts_the_logistic_regression(name: str) -> None:
    torch.manual_seed(0)
    model = build_aggregator(name, 8, 3, hidden=16).eval()
    x, mask, clinical = _batch()
    model.set_normalisation(x[mask], clinical)
    coef, intercept = torch.tensor([1.5, -0.5, 0.25]), 0.3
    model.init_clinical(coef, intercept)
    out = model(x, mask, clinical)
    z = (clinical - clinical.mean(0)) / clinical.std(0)
    expected = torch.sigmoid(z @ coef + intercept)  # the cells add nothing yet: the image head starts at zero
    assert torch.allclose(torch.softmax(out.logits, 1)[:, 1], expected, atol=1e-5)
    assert len(out.aux_logits) == 1  # the clinical branch is also trained on its own


def test_moe_mixes_expert_probabilities_with_its_gate() -> None:
    torch.manual_seed(0)
    model = build_aggregator("moe", 8, 3, hidden=16).eval()
    x, mask, clinical = _batch()
    out = model(x, mask, clinical)
    image, clin = out.aux_logits
    g = out.extras["gate"][:, None]
    mixed = g * image.softmax(1) + (1 - g) * clin.softmax(1)
    assert torch.allclose(out.logits.exp(), mixed, atol=1e-6) and ((g > 0) & (g < 1)).all()


def test_objective_loss_is_cross_entropy_plus_weighted_expert_losses() -> None:
    from leukolab.objectives.mil import MILObjective

    torch.manual_seed(0)
    x, mask, clinical = _batch()
    y = torch.tensor([1, 0, 1])
    weights = torch.tensor([2.0, 0.5])
    objective = MILObjective(build_aggregator("moe", 8, 3, hidden=16, dropout=0.0), class_weights=weights,
                             aux_weight=0.5)
    step = objective.training_step({"x": x, "mask": mask, "clinical": clinical, "label": y, "index": torch.arange(3)})
    out = objective.aggregator(x, mask, clinical)
    aux = sum(F.cross_entropy(a, y, weight=weights) for a in out.aux_logits)
    expected = F.cross_entropy(out.logits, y, weight=weights) + 0.5 * aux / 2
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5) and step.batch_size == 3
    step.loss.backward()
    assert objective.aggregator.gate.weight.grad is not None
