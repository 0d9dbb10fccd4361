"""Converted DINOv2 / DinoBloom models give DINOv2's own features at any multiple of the patch size.

The oracle is facebookresearch/dinov2's forward, written out below from its
definition (``DinoVisionTransformer.interpolate_pos_encoding`` and
``prepare_tokens_with_masks``, ``dinov2/models/vision_transformer.py``), on
tiny self-made checkpoints in DINOv2's layout with a 37x37 (518-px) grid.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import resample_abs_pos_embed

from leukolab.checkpoints import load_checkpoint
from leukolab.data.transforms import release_eval_transform
from leukolab.models.backbones import create_backbone
from leukolab.models.pos_embed import resample_pos_embed
from leukolab.models.weights import backbone_spec_of, load_backbone_weights
from leukolab.zoo import build_vit_from_checkpoint, convert_checkpoint, load_converted_backbone

DIM, DEPTH, HEADS, PATCH, GRID = 64, 2, 2, 14, 37


# ------------------------------------------------------------------ DINOv2, written out from its definition
def dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, antialias: bool, offset: float):
    """``DinoVisionTransformer.interpolate_pos_encoding(x, w, h)`` (class position first, square grid)."""
    npatch, n = (w // PATCH) * (h // PATCH), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // PATCH, h // PATCH
    m = int(math.sqrt(n))
    assert n == m * m
    kwargs = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)} if offset else {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dinov2_forward(sd: dict, x: torch.Tensor, antialias: bool, offset: float) -> torch.Tensor:
    """``forward_features(x)["x_norm"]`` of a DINOv2 state dict: class, registers, patches (normalised)."""
    b, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2)
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t.transpose(1, 2)), dim=1)
    t = t + dinov2_interpolate_pos_encoding(sd["pos_embed"], w, h, antialias, offset)
    if "register_tokens" in sd:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]), dim=1)
    for i in range(DEPTH):
        def p(name: str, i: int = i) -> torch.Tensor:
            return sd[f"blocks.{i}.{name}"]

        y = F.layer_norm(t, (DIM,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, -1, 3, HEADS, DIM // HEADS).permute(
            2, 0, 3, 1, 4)
        y = ((q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        t = t + p("ls1.gamma") * F.linear(y.transpose(1, 2).reshape(b, -1, DIM), p("attn.proj.weight"),
                                          p("attn.proj.bias"))
        y = F.layer_norm(t, (DIM,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                     p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
    return F.layer_norm(t, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def dinov2_state_dict(registers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINOv2-layout backbone with non-trivial weights and a smooth 37x37 position grid."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    smooth = F.interpolate(r(1, DIM, 6, 6), size=(GRID, GRID), mode="bicubic").flatten(2).transpose(1, 2)
    sd = {
        "cls_token": r(1, 1, DIM, std=0.5), "mask_token": torch.zeros(1, DIM),
        "pos_embed": torch.cat([r(1, 1, DIM, std=0.5), 0.5 * smooth + r(1, GRID * GRID, DIM, std=0.05)], dim=1),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH, std=0.05), "patch_embed.proj.bias": r(DIM, std=0.02),
        "norm.weight": 1 + r(DIM, std=0.1), "norm.bias": r(DIM, std=0.1),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, DIM, std=0.5)
    for i in range(DEPTH):
        for name, shape, std in [("norm1.weight", (DIM,), 0.1), ("norm1.bias", (DIM,), 0.1),
                                 ("attn.qkv.weight", (3 * DIM, DIM), 0.1), ("attn.qkv.bias", (3 * DIM,), 0.02),
                                 ("attn.proj.weight", (DIM, DIM), 0.1), ("attn.proj.bias", (DIM,), 0.02),
                                 ("ls1.gamma", (DIM,), 0.3), ("norm2.weight", (DIM,), 0.1),
                                 ("norm2.bias", (DIM,), 0.1), ("mlp.fc1.weight", (4 * DIM, DIM), 0.1),
                                 ("mlp.fc1.bias", (4 * DIM,), 0.02), ("mlp.fc2.weight", (DIM, 4 * DIM), 0.1),
                                 ("mlp.fc2.bias", (DIM,), 0.02), ("ls2.gamma", (DIM,), 0.3)]:
            value = r(*shape, std=std)
            sd[f"blocks.{i}.{name}"] = 1 + value if name.startswith("norm") and name.endswith("weight") else value
    return sd


#: the released rule: DINOv2 hub models without registers (False, 0.1), with registers (True, 0.0)
RULES = {0: (False, 0.1), 4: (True, 0.0)}


# ------------------------------------------------------------------ the position-grid resize
@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("registers", [0, 4])
def test_resample_pos_embed_is_dinov2s_formula(size: int, registers: int) -> None:
    pos = dinov2_state_dict(registers)["pos_embed"]
    antialias, offset = RULES[registers]
    want = dinov2_interpolate_pos_encoding(pos, size, size, antialias, offset)
    got = resample_pos_embed(pos, (size // PATCH,) * 2, num_prefix_tokens=1, antialias=antialias, offset=offset)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_timm_default_is_the_register_rule_but_not_the_plain_one() -> None:
    """timm resamples with antialiasing to an exact size: DINOv2's rule for register models only."""
    pos = dinov2_state_dict(0)["pos_embed"]
    timm_224 = resample_abs_pos_embed(pos, [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(timm_224, dinov2_interpolate_pos_encoding(pos, 224, 224, True, 0.0), atol=0, rtol=0)
    plain = dinov2_interpolate_pos_encoding(pos, 224, 224, False, 0.1)
    assert (timm_224 - plain).abs().max() > 1e-2


def test_unchanged_grid_is_not_touched() -> None:
    pos = dinov2_state_dict(0)["pos_embed"]
    assert resample_pos_embed(pos, (GRID, GRID), antialias=False, offset=0.1).equal(pos)  # no (37 + 0.1) / 37 scale


# ------------------------------------------------------------------ features of the converted model
def _tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)


@pytest.mark.parametrize("registers", [0, 4])
def test_converted_model_gives_dinov2_features_at_any_size(registers: int, tmp_path) -> None:
    sd = dinov2_state_dict(registers, seed=registers)
    src = tmp_path / "dinov2.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, src)
    out = tmp_path / "converted.pt"
    convert_checkpoint(src, out, None, 224, num_heads=HEADS)  # used at 224 by default, grid kept at 37x37
    saved = load_checkpoint(out)
    assert saved["backbone"]["pos_embed"].shape[1] == GRID * GRID + (0 if registers else 1)
    spec = backbone_spec_of(saved)
    assert (spec.interpolate_antialias, spec.interpolate_offset) == RULES[registers] and spec.img_size == 224

    for size in (224, 448):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want = dinov2_forward(sd, x, *RULES[registers])
        direct, _ = build_vit_from_checkpoint(src, size, num_heads=HEADS)
        reloaded, _ = load_converted_backbone(out, size)
        by_name = create_backbone(spec.name, size, **spec.kwargs).eval()
        load_backbone_weights(by_name, out)
        for model in (direct, reloaded, by_name):
            torch.testing.assert_close(_tokens(model, x), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ their evaluation preprocessing
def test_release_eval_transform_resizes_then_crops_the_centre() -> None:
    """A 256-px image with a 16-px red frame: resize 256 + crop 224 (crop_pct 0.875) cuts the frame off."""
    img = Image.new("RGB", (256, 256), (255, 0, 0))
    img.paste((0, 0, 255), (16, 16, 240, 240))
    x = release_eval_transform(224, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))(img)
    assert x.shape == (3, 224, 224)
    assert x[0].max() < 0.02 and x[2].min() > 0.98  # all blue
    whole = release_eval_transform(224, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), crop_pct=1.0)(img)
    assert whole[0, 0, 0] > 0.98 and whole[2, 112, 112] > 0.98  # red corner kept, blue centre
    wide = release_eval_transform(448, "imagenet")(Image.new("RGB", (600, 300)))
    assert wide.shape == (3, 448, 448)
