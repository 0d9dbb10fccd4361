"""Attention maps of prompt-tuned ViTs (``--adapter prompt``): the prompts inside the blocks are not patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.dataset import load_rgb
from leukolab.data.synthetic import make_wbc_dataset
from leukolab.evaluation.attention import attention_maps, attention_weights, inserted_tokens
from leukolab.models.adapters import apply_adapter

torch.set_num_threads(1)


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, depth=2, reg_tokens=2).eval()


@pytest.mark.parametrize("deep", [False, True])
def test_prompt_vit_attention_maps_are_the_prefix_rows_over_the_patches_only(deep: bool) -> None:
    vit = _vit()
    adapter = apply_adapter(vit, "prompt", tokens=3, deep=deep)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    maps = attention_maps(vit, x)
    heads, p, n = vit.blocks[-1].attn.num_heads, vit.num_prefix_tokens, 3
    assert maps.shape == (2, p, heads, 4, 4)  # 16 patches on a 4x4 grid, 3 prefix tokens (cls + 2 registers)

    # the VPT reference, written out: prompts after the prefix; deep ones replaced at every block
    prompts = adapter.prompt_tokens.detach()
    adapter.remove()
    with torch.no_grad():
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        h = torch.cat([h[:, :p], prompts[0].expand(2, -1, -1), h[:, p:]], 1)
        for i, block in enumerate(vit.blocks):
            if deep and i > 0:
                h = torch.cat([h[:, :p], prompts[i].expand(2, -1, -1), h[:, p + n:]], 1)
            if i == len(vit.blocks) - 1:
                w = attention_weights(block.attn, block.norm1(h))
            h = block(h)
    assert w.shape[-1] == p + n + 16
    want = w[:, :, :p, p + n:].permute(0, 2, 1, 3).reshape(2, p, heads, 4, 4)
    torch.testing.assert_close(maps, want, atol=1e-5, rtol=0)
    # patch share + prefix share + prompt share = 1: the prompts' columns are left out of the maps
    prefix_share = w[:, :, :p, :p].sum(-1).permute(0, 2, 1)
    prompt_share = w[:, :, :p, p:p + n].sum(-1).permute(0, 2, 1)
    assert (prompt_share > 1e-3).all()
    torch.testing.assert_close(maps.sum((-1, -2)) + prefix_share + prompt_share, torch.ones(2, p, heads))
    assert inserted_tokens(p + n + 16, p + 16) == n
    with pytest.raises(Exception, match="cannot tell its patch tokens apart"):
        inserted_tokens(p + 16, p + n + 16)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch deep-prompt run on a 2-block ViT-Tiny at 32 px, with Reinhard stain normalisation (seconds)."""
    from leukolab.checkpoints import BackboneSpec, save_checkpoint
    from leukolab.pipelines.classify import train_classifier

    root = tmp_path_factory.mktemp("prompt")
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2)
    spec = BackboneSpec("vit_tiny_patch16_224", {"depth": 2}, img_size=32, patch_size=16)
    init = save_checkpoint({"backbone": vit.state_dict(), "backbone_spec": spec.to_dict()}, root / "vit.pt")
    data = make_wbc_dataset(root / "data", 4, size=32, seed=0, difficulty=0.2, progress=False)
    return train_classifier(root / "runs", overrides={
        "data.path": str(data), "data.img_size": 32, "data.batch_size": 8, "model.backbone": "vit_tiny_patch16_224",
        "model.init": str(init), "adapter.name": "prompt", "adapter.prompt.tokens": 2, "adapter.prompt.deep": True,
        "model.drop_path": 0.0, "optim.warmup_epochs": 0, "train.epochs": 1, "train.progress": False,
        "train.device": "cpu", "data.check_images": False, "seed": 0, "data.stain_norm": "reinhard",
    })


def test_viz_attention_and_pca_on_a_prompt_run(prompt_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import leukolab.pipelines.viz as viz
    from leukolab.pipelines.predictors import load_predictor

    images = sorted((Path(str(prompt_run)).parent.parent / "data" / "monocyte").glob("*.png"))[:2]
    seen: list[torch.Tensor] = []

    def spy(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return attention_maps(model, x)

    monkeypatch.setattr(viz, "attention_maps", spy)
    code = main(["viz", "attention", str(prompt_run), *map(str, images), "--out", str(tmp_path / "att")])
    assert code == 0, capsys.readouterr().err
    pngs = sorted((tmp_path / "att").glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 0
    # viz fed the images as evaluate does: the run's Reinhard normalisation, shrink, resize, normalise
    want = load_predictor(prompt_run, device="cpu").tensors([load_rgb(p) for p in images])  # type: ignore[attr-defined]
    torch.testing.assert_close(torch.cat(seen), want, atol=1e-6, rtol=0)
    assert main(["viz", "pca", str(prompt_run), *map(str, images), "--out", str(tmp_path / "pca.png")]) == 0
    assert (tmp_path / "pca.png").is_file()
