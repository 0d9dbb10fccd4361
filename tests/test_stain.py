"""Stain augmentation (HED jitter, degradation) and stain normalisation (Reinhard, Macenko)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter

from leukolab.data.stain import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    HEDJitter,
    MacenkoNormaliser,
    RandomDegrade,
    ReinhardNormaliser,
    StainNormaliser,
    build_normaliser,
    hed_to_rgb,
    lab_to_rgb,
    rgb_to_hed,
    rgb_to_lab,
)
from leukolab.data.synthetic.cells import WBC_CLASSES, render_cell
from leukolab.errors import LeukolabError


def _cell(label: str = "lymphocyte", seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    return render_cell(label, size, np.random.default_rng(seed), difficulty=0.3)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def _tint(rgb: np.ndarray, gains: tuple[float, float, float], offset: float = 0.0) -> np.ndarray:
    """Another lab's look: per-channel gain in optical density (stain strength) plus a brightness offset."""
    od = -np.log(np.maximum(rgb / 255.0, 1e-3))
    return np.clip(255.0 * np.exp(-od * np.asarray(gains)) + offset, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- colour spaces
def test_hed_matrix_is_ruifrok_johnston_and_round_trips() -> None:
    assert np.allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3))
    assert np.allclose(RGB_FROM_HED[0], [0.65, 0.70, 0.29])
    # pure haematoxylin of concentration 0.8 is the colour exp(-0.8 * its OD vector), and decodes back
    rgb = hed_to_rgb(np.array([[[0.8, 0.0, 0.0]]]))
    assert np.allclose(rgb[0, 0], 255 * np.exp(-0.8 * RGB_FROM_HED[0]))
    assert np.allclose(rgb_to_hed(rgb)[0, 0], [0.8, 0.0, 0.0], atol=1e-9)
    img, _ = _cell()
    assert np.abs(hed_to_rgb(rgb_to_hed(img)) - img).max() < 1e-6


def test_lab_matches_reference_values_and_inverts() -> None:
    lab = rgb_to_lab(np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8))[0]
    assert np.allclose(lab[0], [100.0, 0.0, 0.0], atol=0.05)
    assert np.allclose(lab[1], [53.24, 80.09, 67.20], atol=0.1)  # sRGB red, D65 (scikit-image / Lindbloom)
    assert np.allclose(lab[2], [0.0, 0.0, 0.0], atol=0.05)
    img, _ = _cell("eosinophil", 3)
    assert np.abs(lab_to_rgb(rgb_to_lab(img)) - img).max() <= 1.0


# --------------------------------------------------------------------------- HED jitter
def test_hed_jitter_without_strength_is_the_identity() -> None:
    img, _ = _cell("monocyte", 1)
    out = _arr(HEDJitter(sigma=0.0, bias=0.0)(Image.fromarray(img)))
    assert np.abs(out - img).max() <= 1.0


def test_hed_jitter_is_the_hed_formula_with_torch_draws() -> None:
    img, _ = _cell("neutrophil", 2)
    torch.manual_seed(7)
    out = _arr(HEDJitter(sigma=0.2, bias=0.1)(Image.fromarray(img)))
    torch.manual_seed(7)
    u = torch.rand(3, dtype=torch.float64).numpy(), torch.rand(3, dtype=torch.float64).numpy()
    alpha, beta = 0.8 + 0.4 * u[0], -0.1 + 0.2 * u[1]
    expected = hed_to_rgb(rgb_to_hed(img) * alpha + beta)
    assert np.abs(out - expected).max() <= 1.0
    assert np.abs(out - img).mean() > 2.0  # it did something
    torch.manual_seed(7)
    assert np.array_equal(out, _arr(HEDJitter(sigma=0.2, bias=0.1)(Image.fromarray(img))))  # seeded


@pytest.mark.parametrize("label", WBC_CLASSES)
def test_hed_jitter_keeps_the_nucleus_darker_than_the_cytoplasm(label: str) -> None:
    img, mask = _cell(label, 5)
    grey = img.astype(np.float64).mean(axis=2)
    cut = np.quantile(grey[mask], 0.3)
    nucleus, cytoplasm = mask & (grey <= cut), mask & (grey > cut)  # darkest 30 % of the cell: its nucleus
    gap0 = grey[cytoplasm].mean() - grey[nucleus].mean()
    assert gap0 > 10
    torch.manual_seed(0)
    jitter, changed = HEDJitter(), 0
    for _ in range(40):
        out = _arr(jitter(Image.fromarray(img)))
        g = out.mean(axis=2)
        assert g[nucleus].mean() < g[cytoplasm].mean() - 0.5 * gap0
        changed += np.abs(out - img).mean() > 0.5
    assert changed >= 30  # default strength does change the colours


def test_hed_jitter_probability_and_bad_arguments() -> None:
    img = Image.fromarray(_cell()[0])
    torch.manual_seed(0)
    assert HEDJitter(sigma=0.5, bias=0.2, p=0.0)(img) is img
    with pytest.raises(LeukolabError, match="sigma"):
        HEDJitter(sigma=-0.1)


# --------------------------------------------------------------------------- degradation
def _sharpness(img: Image.Image) -> float:
    return float(np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float64).var())


def test_random_degrade_blurs_keeps_size_and_follows_the_seed() -> None:
    img = Image.fromarray(_cell("basophil", 4, 128)[0])
    deg = RandomDegrade(p=1.0, max_blur=2.0, min_scale=0.4)
    torch.manual_seed(3)
    outs = [deg(img) for _ in range(12)]
    assert all(o.size == img.size and o.mode == "RGB" for o in outs)
    assert all(_sharpness(o) < _sharpness(img) for o in outs)
    torch.manual_seed(3)
    assert all(np.array_equal(np.asarray(a), np.asarray(deg(img))) for a in outs)
    assert RandomDegrade(p=0.0)(img) is img


# --------------------------------------------------------------------------- normalisers
def test_reinhard_to_itself_is_near_identity_and_moves_means_to_the_reference() -> None:
    a, _ = _cell("lymphocyte", 10)
    b = _tint(_cell("neutrophil", 11)[0], (1.4, 0.8, 1.2), offset=-15)
    self_norm = _arr(ReinhardNormaliser().fit(Image.fromarray(a))(Image.fromarray(a)))
    assert np.abs(self_norm - a).mean() < 0.6 and np.abs(self_norm - a).max() <= 3
    norm = ReinhardNormaliser().fit([Image.fromarray(b)])
    out = norm(Image.fromarray(a))
    lab_out, lab_a, lab_b = (rgb_to_lab(np.asarray(x)).reshape(-1, 3) for x in (out, a, b))
    assert np.allclose(lab_out.mean(0), lab_b.mean(0), atol=1.0)
    assert np.allclose(lab_out.std(0), lab_b.std(0), rtol=0.1, atol=0.5)
    assert np.abs(lab_a.mean(0) - lab_b.mean(0)).max() > 5  # the test is not vacuous


def test_macenko_maps_a_restained_image_back_towards_the_reference() -> None:
    ref, _ = _cell("monocyte", 20)
    other = _tint(ref, (1.5, 0.7, 1.3))
    mac = MacenkoNormaliser().fit(Image.fromarray(ref))
    out = _arr(mac(Image.fromarray(other)))
    before, after = np.abs(other.astype(np.float64) - ref).mean(), np.abs(out - ref).mean()
    assert after < 0.6 * before
    assert np.abs(_arr(mac(Image.fromarray(ref))) - ref).mean() < 4.0  # the reference itself barely moves


def test_macenko_leaves_a_flat_image_alone_and_refuses_a_flat_reference() -> None:
    mac = MacenkoNormaliser().fit(Image.fromarray(_cell()[0]))
    for value in (0, 128, 235, 255):
        flat = Image.new("RGB", (32, 32), (value, value, value))
        assert np.array_equal(np.asarray(mac(flat)), np.asarray(flat))
    with pytest.raises(LeukolabError, match="stained pixels"):
        MacenkoNormaliser().fit([Image.new("RGB", (16, 16), (240, 230, 230))])


@pytest.mark.parametrize("name", ["reinhard", "macenko"])
def test_state_round_trips_through_yaml(name: str) -> None:
    img, ref = Image.fromarray(_cell("eosinophil", 30)[0]), Image.fromarray(_cell("basophil", 31)[0])
    norm = build_normaliser(name)
    assert isinstance(norm, StainNormaliser)
    with pytest.raises(LeukolabError, match="not fitted"):
        norm(img)
    state = norm.fit([ref]).state()
    again = build_normaliser(name, yaml.safe_load(yaml.safe_dump(state)))
    assert again.state() == state
    assert np.array_equal(np.asarray(again(img)), np.asarray(norm(img)))


def test_build_normaliser_names_and_bad_states() -> None:
    assert build_normaliser("none") is None
    assert isinstance(build_normaliser("Reinhard"), ReinhardNormaliser)
    with pytest.raises(LeukolabError, match="'vahadane' is unknown; expected one of none, reinhard, macenko"):
        build_normaliser("vahadane")
    with pytest.raises(LeukolabError, match="macenko"):
        build_normaliser("reinhard", {"method": "macenko", "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(LeukolabError, match="'std'"):
        build_normaliser("reinhard", {"mean": [50.0, 0.0, 0.0], "std": [1.0, 2.0]})
