"""Adapters on timm ViTs: frozen backbones, exact identity at step 0, LoRA merging, prompt layouts, bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from leukolab.errors import LeukolabError
from leukolab.models.adapters import apply_adapter, count_parameters, load_adapter
from leukolab.registry import ADAPTERS

#: (adapter, options) that train on a 32 px ViT with 16 px patches (4 patch tokens)
ADAPTER_CASES = [
    ("lora", {"rank": 4, "alpha": 8, "targets": "qkv,proj"}),
    ("lora", {"rank": 2, "targets": ["fc1", "fc2", "attn.qkv"]}),
    ("prompt", {"tokens": 3}),
    ("prompt", {"tokens": 2, "deep": True}),
    ("bottleneck", {"hidden": 8}),
    ("bottleneck", {"reduction": 32, "positions": "mlp"}),
    ("adaptformer", {"hidden": 8, "scale": 0.5}),
]
ZERO_INIT = ["lora", "bottleneck", "adaptformer"]


def make_vit(kind: str = "plain", seed: int = 0) -> nn.Module:
    """A small random ViT: plain timm, with 4 registers, or DINOv2-style (patch 14, layer scale, registers)."""
    torch.manual_seed(seed)
    if kind == "plain":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=3)
    if kind == "reg":
        return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, depth=3, reg_tokens=4)
    return timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0, depth=3, embed_dim=96,
                             num_heads=2, init_values=0.1)


def images(vit: nn.Module, n: int = 4, seed: int = 1) -> torch.Tensor:
    size = vit.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["plain", "reg", "dinov2"])
@pytest.mark.parametrize("name", ZERO_INIT)
def test_zero_initialised_adapters_reproduce_the_frozen_model_exactly(name: str, kind: str) -> None:
    vit = make_vit(kind).eval()
    x = images(vit)
    frozen = vit(x)
    adapter = apply_adapter(vit, name)
    assert torch.equal(vit(x), frozen)  # bit for bit, not approximately
    # the adapter is live: a non-zero up-projection changes the outputs, and removing it restores them
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n or ".up." in n:
                p.normal_(0, 0.1)
    assert not torch.allclose(vit(x), frozen, atol=1e-4)
    adapter.remove()
    assert torch.equal(vit(x), frozen)


@pytest.mark.parametrize(("name", "options"), ADAPTER_CASES)
def test_only_adapter_and_head_train_and_the_backbone_stays_bit_identical(name: str, options: dict) -> None:
    vit = make_vit("plain").train()
    before = copy.deepcopy(vit.state_dict())
    adapter = apply_adapter(vit, name, **options)
    head = nn.Linear(vit.num_features, 3)
    opt = torch.optim.AdamW([*adapter.parameters(), *head.parameters()], lr=1e-2, weight_decay=0.1)
    x, y = images(vit, 8), torch.arange(8) % 3
    losses, moved = [], set()
    for _ in range(4):
        loss = nn.functional.cross_entropy(head(vit(x)), y)
        opt.zero_grad()
        loss.backward()
        for n, p in vit.named_parameters():
            assert not p.requires_grad and p.grad is None, n
        for n, p in [*adapter.named_parameters(), *head.named_parameters()]:
            assert p.grad is not None, n
            if p.grad.abs().sum() > 0:  # LoRA's A gets a gradient once B has left zero
                moved.add(n)
        opt.step()
        losses.append(loss.item())
    assert moved == {n for n, _ in [*adapter.named_parameters(), *head.named_parameters()]}
    assert losses[-1] < losses[0]
    after = vit.state_dict()
    assert after.keys() == before.keys()  # timm's names: nothing was wrapped or added
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    trainable, total = count_parameters(nn.ModuleList([vit, adapter]))
    assert trainable == sum(p.numel() for p in adapter.parameters()) > 0
    assert total == trainable + sum(p.numel() for p in vit.parameters())


def test_lora_parameter_count_follows_rank_times_layer_widths() -> None:
    vit = make_vit("plain")
    adapter = apply_adapter(vit, "lora", rank=8, targets="qkv,proj")
    d = vit.embed_dim
    assert sum(p.numel() for p in adapter.parameters()) == len(vit.blocks) * 8 * ((d + 3 * d) + (d + d))
    assert adapter.targets == [f"blocks.{i}.attn.{t}" for i in range(3) for t in ("qkv", "proj")]


@pytest.mark.parametrize("kind", ["plain", "dinov2"])
def test_merged_lora_gives_the_unmerged_outputs(kind: str) -> None:
    vit = make_vit(kind).eval()
    adapter = apply_adapter(vit, "lora", rank=4, alpha=8, targets="qkv,proj,fc1,fc2")
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B.normal_(0, 0.2)
    x = images(vit)
    unmerged = vit(x)
    merged_state = adapter.merge(vit.state_dict())
    plain = make_vit(kind, seed=5).eval()  # different random weights, overwritten by the merged ones
    plain.load_state_dict(merged_state, strict=True)
    merged = plain(x)
    adapter.remove()
    assert not torch.allclose(vit(x), unmerged, atol=1e-3)  # the update matters ...
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)  # ... and the merge keeps it


def _tokens_after_pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


@pytest.mark.parametrize("kind", ["plain", "reg"])
@pytest.mark.parametrize("deep", [False, True])
def test_prompt_tuning_matches_the_vpt_reference(kind: str, deep: bool) -> None:
    """Prompts sit after the class (and register) tokens; shallow ones flow through, deep ones are replaced."""
    vit = make_vit(kind).eval()
    x = images(vit)
    adapter = apply_adapter(vit, "prompt", tokens=3, deep=deep)
    prompts = adapter.prompt_tokens.detach()
    p, n = vit.num_prefix_tokens, 3
    with torch.no_grad():
        h = _tokens_after_pos_embed(vit, x)
        adapter.remove()  # the reference runs the plain blocks on an explicit sequence
        h = torch.cat([h[:, :p], prompts[0].expand(len(x), -1, -1), h[:, p:]], 1)
        for i, block in enumerate(vit.blocks):
            if deep and i > 0:
                h = torch.cat([h[:, :p], prompts[i].expand(len(x), -1, -1), h[:, p + n:]], 1)
            h = block(h)
        want = vit.norm(torch.cat([h[:, :p], h[:, p + n:]], 1))
        adapted = load_adapter(vit, adapter.config(), adapter.state_dict())
        got = vit.forward_features(x)
    assert got.shape == want.shape == (len(x), p + vit.patch_embed.num_patches, vit.embed_dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert adapted.prompt_tokens.shape == ((len(vit.blocks) if deep else 1), n, vit.embed_dim)
    # timm's own intermediate read-out sees the usual layout (prefix tokens split off, no prompts among patches)
    (patches, prefix), = vit.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True,
                                                    return_prefix_tokens=True)
    assert prefix.shape[1] == p and patches.shape[1] == vit.patch_embed.num_patches


@pytest.mark.parametrize(("name", "options"), ADAPTER_CASES)
def test_config_and_state_rebuild_the_same_adapted_model(name: str, options: dict) -> None:
    vit = make_vit("plain").eval()
    adapter = apply_adapter(vit, name, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = images(vit)
    want = vit(x)
    other = make_vit("plain").eval()
    rebuilt = load_adapter(other, adapter.config(), adapter.state_dict())
    assert rebuilt.config() == adapter.config()
    assert torch.equal(other(x), want)


def test_bad_adapter_input_gives_one_line_errors() -> None:
    vit = make_vit("plain")
    with pytest.raises(LeukolabError, match=r"needs a timm Vision Transformer.*ResNet"):
        apply_adapter(timm.create_model("resnet10t", num_classes=0), "lora")
    with pytest.raises(LeukolabError, match=r"'query' matches no linear layer.*attn.proj, attn.qkv, mlp.fc1, mlp.fc2"):
        apply_adapter(vit, "lora", targets="qkv,query")
    for rank in (0, -2, 1.5):
        with pytest.raises(LeukolabError, match="LoRA rank"):
            apply_adapter(vit, "lora", rank=rank)
    with pytest.raises(LeukolabError, match=r"prompt tokens 5: expected a whole number from 1 to 4"):
        apply_adapter(vit, "prompt", tokens=5)
    with pytest.raises(LeukolabError, match=r"unknown option\(s\) rank; expected some of: tokens, deep"):
        apply_adapter(vit, "prompt", rank=4)
    with pytest.raises(LeukolabError, match="unknown adapter 'loha'; expected one of: adaptformer, bottleneck"):
        apply_adapter(vit, "loha")
    with pytest.raises(LeukolabError, match="positions"):
        apply_adapter(vit, "bottleneck", positions="ffn")
    with pytest.raises(LeukolabError, match="only lora can"):
        apply_adapter(vit, "adaptformer").merge(vit.state_dict())
    assert not any(vit._forward_hooks for vit in [*vit.modules()][:1])  # failed builds leave no hooks
    assert ADAPTERS.names() == ["adaptformer", "bottleneck", "lora", "prompt"]
