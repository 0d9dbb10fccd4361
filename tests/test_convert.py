"""Offline ViT checkpoint conversion (leukolab.zoo.convert) on tiny, self-made checkpoints."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from leukolab.checkpoints import CHECKPOINT_FORMAT, IMAGENET_MEAN, BackboneSpec
from leukolab.errors import LeukolabError
from leukolab.zoo import (
    RELEASES,
    ConversionReport,
    build_vit_from_checkpoint,
    convert_checkpoint,
    convert_state_dict,
    detect_format,
    get_release,
    infer_vit_config,
    load_converted_backbone,
    load_state_dict_file,
    match_release,
)

DIM, DEPTH, HEADS = 64, 2, 2


def tiny_vit(img_size: int, patch: int = 14, **kwargs) -> VisionTransformer:
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        **kwargs,
    )
    # randomise everything (layer scale, biases, norms) so that a wrong mapping shows
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def dinov2_source() -> VisionTransformer:
    """A DINOv2-with-registers-like timm model at 518 px (37x37 grid), as timm builds vit_*_reg4_dinov2."""
    return tiny_vit(518, reg_tokens=4, init_values=1e-5, no_embed_class=True)


def to_dinov2(model: VisionTransformer, *, chunks: int = 0, prefix: str = "teacher.backbone.") -> dict:
    """Rename a timm no_embed_class reg model into the facebookresearch/dinov2 layout."""
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    cls_pos = torch.randn(1, 1, DIM, generator=gen)  # DINOv2 keeps a class position; timm folds it in
    out = {
        "cls_token": sd["cls_token"] - cls_pos,
        "pos_embed": torch.cat([cls_pos, sd["pos_embed"]], dim=1),
        "register_tokens": sd["reg_token"],
        "mask_token": torch.zeros(1, DIM),
    }
    per_chunk = DEPTH // chunks if chunks else 0
    for key, value in sd.items():
        if key in ("cls_token", "pos_embed", "reg_token"):
            continue
        if chunks and key.startswith("blocks."):
            idx = int(key.split(".")[1])
            key = f"blocks.{idx // per_chunk}.{key[len('blocks.') :]}"
        out[key] = value
    sd = {prefix + k: v for k, v in out.items()}
    head_prefix = prefix.replace("backbone.", "")
    sd[head_prefix + "dino_head.mlp.0.weight"] = torch.randn(8, DIM)
    sd[head_prefix + "dino_head.last_layer.weight_g"] = torch.randn(16, 1)
    return sd


def reference_at(model: VisionTransformer, img_size: int, **kwargs) -> VisionTransformer:
    """The source model at another size, pos_embed resampled the same way the converter does."""
    ref = tiny_vit(img_size, **kwargs)
    sd = dict(model.state_dict())
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    grid = list(ref.patch_embed.grid_size)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], grid, num_prefix_tokens=prefix)
    ref.load_state_dict(sd)
    return ref.eval()


def assert_same(model: torch.nn.Module, reference: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), reference.forward_features(images), atol=1e-5, rtol=0
        )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("chunks", [0, 2])
def test_dinov2_round_trip_matches_resampled_source(chunks: int, images: torch.Tensor) -> None:
    kwargs = {"reg_tokens": 4, "init_values": 1e-5, "no_embed_class": True}
    source = dinov2_source()
    sd = to_dinov2(source, chunks=chunks)
    assert detect_format(sd) == "dinov2"

    target = tiny_vit(224, **kwargs)
    converted, report = convert_state_dict(sd, None, target)
    target.load_state_dict(converted, strict=True)
    target.eval()

    ref = reference_at(source, 224, **kwargs)
    assert_same(target, ref, images)
    assert report.resized == ["pos_embed: 37x37 -> 16x16 (bicubic, antialias on)"]  # DINOv2's rule with registers
    assert "teacher.dino_head.mlp.0.weight" in report.dropped
    assert "teacher.dino_head.last_layer.weight_g" in report.dropped
    assert "teacher.backbone.mask_token" in report.dropped
    assert report.missing == []
    assert ("teacher.backbone.register_tokens", "reg_token") in report.mapped
    assert "dropped" in report.summary() and "37x37 -> 16x16" in report.summary()


def test_dinov2_without_registers_uses_dinov2_interpolation(images: torch.Tensor) -> None:
    """No registers: DINOv2's scale factor (n + 0.1) / 37 without antialiasing, not timm's resize."""
    source = tiny_vit(518, init_values=1e-5)  # class position inside pos_embed, as DINOv2 stores it
    sd = {**source.state_dict(), "mask_token": torch.zeros(1, DIM)}
    target = tiny_vit(224, init_values=1e-5)
    converted, report = convert_state_dict(sd, "dinov2", target)
    assert report.resized == ["pos_embed: 37x37 -> 16x16 (bicubic, offset 0.1, antialias off)"]
    grid = source.pos_embed[:, 1:].reshape(1, 37, 37, DIM).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    torch.testing.assert_close(converted["pos_embed"][:, 1:], want.flatten(2).transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(converted["pos_embed"][:, :1], source.pos_embed[:, :1], atol=0, rtol=0)


def test_dinov2_into_model_with_class_position(images: torch.Tensor) -> None:
    """Into a no_embed_class=False target (positions for cls and registers): the same network."""
    source = dinov2_source()
    sd = to_dinov2(source, prefix="module.")
    target = tiny_vit(224, reg_tokens=4, init_values=1e-5, no_embed_class=False)
    converted, _ = convert_state_dict(sd, "dinov2", target)
    target.load_state_dict(converted)
    ref = reference_at(source, 224, reg_tokens=4, init_values=1e-5, no_embed_class=True)
    assert_same(target, ref, images)


def test_build_and_convert_checkpoint_file(tmp_path, images: torch.Tensor) -> None:
    source = dinov2_source()
    src = tmp_path / "dinobloom-tiny.pth"
    teacher = {k.removeprefix("teacher."): v for k, v in to_dinov2(source).items()}
    wrapped = {"teacher": teacher, "iteration": 7}
    torch.save(wrapped, src)
    assert "backbone.cls_token" in load_state_dict_file(src)

    config = infer_vit_config(load_state_dict_file(src), None, num_heads=HEADS)
    assert config["img_size"] == 518 and config["patch_size"] == 14 and config["embed_dim"] == DIM
    assert config["depth"] == DEPTH and config["reg_tokens"] == 4 and config["init_values"] is not None
    assert config["mlp_ratio"] == 4.0 and config["no_embed_class"] is True

    model, report = build_vit_from_checkpoint(src, 224, num_heads=HEADS)
    ref = reference_at(source, 224, reg_tokens=4, init_values=1e-5, no_embed_class=True)
    assert_same(model, ref, images)
    assert isinstance(report, ConversionReport)

    out = tmp_path / "converted" / "backbone.pt"
    report = convert_checkpoint(src, out, None, 224, num_heads=HEADS)
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["format"] == CHECKPOINT_FORMAT and saved["source_format"] == "dinov2"
    assert saved["source"] == str(src) and saved["task"] == "converted" and saved["release"] is None
    assert "release: not a known release" in report.notes
    assert saved["backbone"]["pos_embed"].shape == (1, 37 * 37, DIM)  # the original grid is kept
    spec = BackboneSpec.from_dict(saved["backbone_spec"])
    assert spec.img_size == 224 and spec.patch_size == 14 and spec.mean == IMAGENET_MEAN
    assert spec.kwargs["reg_tokens"] == 4 and spec.kwargs["embed_dim"] == DIM and spec.crop_pct == 0.875
    rebuilt, rebuilt_spec = load_converted_backbone(out)
    assert rebuilt_spec == spec
    assert_same(rebuilt, ref, images)

    with pytest.raises(LeukolabError, match="already exists"):
        convert_checkpoint(src, out, None, 224, num_heads=HEADS)


def to_hf_vitmae(model: VisionTransformer) -> dict:
    """Rename a plain timm ViT into HuggingFace ViTMAEForPreTraining names (split q/k/v)."""
    sd = model.state_dict()
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "decoder.decoder_embed.weight": torch.randn(32, DIM),
        "decoder.mask_token": torch.zeros(1, 1, 32),
    }
    for i in range(DEPTH):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{h}attention.attention.query.{kind}"] = q
            out[f"{h}attention.attention.key.{kind}"] = k
            out[f"{h}attention.attention.value.{kind}"] = v
            out[f"{h}attention.output.dense.{kind}"] = sd[f"{b}attn.proj.{kind}"]
            out[f"{h}layernorm_before.{kind}"] = sd[f"{b}norm1.{kind}"]
            out[f"{h}layernorm_after.{kind}"] = sd[f"{b}norm2.{kind}"]
            out[f"{h}intermediate.dense.{kind}"] = sd[f"{b}mlp.fc1.{kind}"]
            out[f"{h}output.dense.{kind}"] = sd[f"{b}mlp.fc2.{kind}"]
    return out


def test_hf_vitmae_split_qkv(images: torch.Tensor) -> None:
    source = tiny_vit(224, patch=16)
    sd = to_hf_vitmae(source)
    assert detect_format(sd) == "hf-vitmae"
    target = tiny_vit(224, patch=16)
    converted, report = convert_state_dict(sd, "hf-vitmae", target)
    target.load_state_dict(converted, strict=True)
    assert_same(target, source, images)
    assert "decoder.decoder_embed.weight" in report.dropped
    assert ("vit.encoder.layer.0.attention.attention.key.weight", "blocks.0.attn.qkv.weight") in report.mapped
    assert report.resized == [] and report.missing == []


def test_timm_checkpoint_with_other_grid(images: torch.Tensor) -> None:
    source = tiny_vit(256, patch=16)  # 16x16 grid, class position inside pos_embed
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    assert detect_format(sd) == "timm"
    target = tiny_vit(224, patch=16)
    converted, report = convert_state_dict(sd, None, target)
    target.load_state_dict(converted, strict=True)
    ref = reference_at(source, 224, patch=16)
    assert_same(target, ref, images)
    assert report.resized == ["pos_embed: 16x16 -> 14x14 (bicubic, antialias on)"]


def test_missing_block_is_refused() -> None:
    sd = {k: v for k, v in to_dinov2(dinov2_source()).items() if ".blocks.1." not in k}
    target = tiny_vit(224, reg_tokens=4, init_values=1e-5, no_embed_class=True)
    with pytest.raises(LeukolabError, match=r"missing \d+ keys.*blocks\.1\."):
        convert_state_dict(sd, None, target)
    converted, report = convert_state_dict(sd, None, target, strict=False)
    assert report.missing and all(k.startswith("blocks.1.") for k in report.missing)
    assert not any(k.startswith("blocks.1.") for k in converted)


def test_shape_that_cannot_fit_is_refused() -> None:
    sd = to_dinov2(dinov2_source())
    target = VisionTransformer(
        img_size=224,
        patch_size=14,
        embed_dim=96,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        reg_tokens=4,
        init_values=1e-5,
        no_embed_class=True,
    )
    with pytest.raises(LeukolabError, match="cannot be fitted"):
        convert_state_dict(sd, None, target)


def test_unknown_layout_and_bad_files(tmp_path) -> None:
    junk = {"foo.weight": torch.randn(3, 3), "bar": torch.randn(2)}
    with pytest.raises(LeukolabError, match="unknown checkpoint layout"):
        detect_format(junk)
    with pytest.raises(LeukolabError, match="unknown checkpoint layout"):
        convert_state_dict(junk, None, tiny_vit(224))
    with pytest.raises(LeukolabError, match="unknown checkpoint format"):
        convert_state_dict(junk, "dinov3", tiny_vit(224))

    with pytest.raises(LeukolabError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(LeukolabError, match="cannot read checkpoint"):
        load_state_dict_file(broken)
    with pytest.raises(LeukolabError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out.pt", None, 224)


def test_release_table_and_matching() -> None:
    assert set(RELEASES) == {
        *(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")), *(f"dinobloom_{s}" for s in "sblg")
    }
    small = get_release("dinov2_vits14")
    assert (small.embed_dim, small.depth, small.num_heads, small.img_size) == (384, 12, 6, 518)
    assert (small.interpolate_antialias, small.interpolate_offset, small.crop_pct) == (False, 0.1, 0.875)
    reg = get_release("dinov2_vitg14_reg")
    assert reg.timm_name == "vit_giant_patch14_reg4_dinov2" and reg.ffn == "swiglu" and reg.interpolate_offset == 0
    bloom = get_release("dinobloom_b")
    assert bloom.img_size == 224 and bloom.crop_pct == 1.0 and bloom.timm_name == "vit_base_patch14_dinov2"
    config = {"embed_dim": 384, "depth": 12, "patch_size": 14, "img_size": 224, "reg_tokens": 0,
              "mlp_layer": "mlp", "init_values": 1e-5, "class_token": True}
    assert match_release(config) is get_release("dinobloom_s")  # DinoBloom-S: DINOv2-S with a 16x16 grid
    assert match_release({**config, "img_size": 518}) is small
    assert match_release({**config, "depth": 6}) is None
    spec = bloom.spec()
    assert spec.name == "vit_base_patch14_dinov2" and spec.img_size == 224 and spec.interpolate_offset == 0.1
    with pytest.raises(LeukolabError, match="unknown release 'dinov3'"):
        get_release("dinov3")


def test_release_timm_names_build_the_release_architecture() -> None:
    """Each release's timm model has its width, depth, heads, registers and MLP (built on the meta device)."""
    import timm

    for release in RELEASES.values():
        with torch.device("meta"):
            model = timm.create_model(release.timm_name, pretrained=False, num_classes=0, img_size=224)
        assert model.embed_dim == release.embed_dim and len(model.blocks) == release.depth, release.name
        assert model.blocks[0].attn.num_heads == release.num_heads and model.num_reg_tokens == release.reg_tokens
        hidden = model.blocks[0].mlp.fc2.in_features
        assert hidden == (4096 if release.ffn == "swiglu" else 4 * release.embed_dim), release.name


def test_pickled_source_needs_allow_pickle(tmp_path) -> None:
    source = tiny_vit(224, patch=16)
    src = tmp_path / "pickled.pth"
    torch.save({"model": source.state_dict(), "args": ConversionReport()}, src)  # a pickled Python object
    with pytest.raises(LeukolabError, match=r"pickled Python objects.*--allow-pickle"):
        load_state_dict_file(src)
    with pytest.raises(LeukolabError, match="pickled Python objects"):
        convert_checkpoint(src, tmp_path / "out.pt", None, 224)
    assert not (tmp_path / "out.pt").exists()
    assert set(load_state_dict_file(src, allow_pickle=True)) == set(source.state_dict())
