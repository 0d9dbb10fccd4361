"""Adapters on timm ViTs: frozen backbones, exact identity at step 0, LoRA merging, prompt layouts, bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pandas as pd
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


# --------------------------------------------------------------------------- adapter runs: train, reload, export
@pytest.fixture(scope="module")
def vit_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' 2-block ViT-Tiny backbone file at 32 px (random weights, timm names + backbone_spec)."""
    from leukolab.checkpoints import BackboneSpec, save_checkpoint

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2)
    spec = BackboneSpec("vit_tiny_patch16_224", {"depth": 2}, img_size=32, patch_size=16)
    return save_checkpoint({"backbone": vit.state_dict(), "backbone_spec": spec.to_dict()},
                           tmp_path_factory.mktemp("init") / "vit.pt")


def _adapter_run(data: Path, init: Path, out: Path, overrides: Callable[..., dict], adapter: str, **extra: object
                 ) -> Path:
    from leukolab.pipelines.classify import train_classifier

    return train_classifier(out, overrides=overrides(
        data, **{"model.backbone": "vit_tiny_patch16_224", "model.init": str(init), "adapter.name": adapter,
                 "train.epochs": 2, "optim.lr": 3e-3, "data.check_images": False, **extra}))


@pytest.fixture(scope="module")
def lora_run(wbc_small: Path, vit_init: Path, tmp_path_factory: pytest.TempPathFactory,
             tiny_overrides: Callable[..., dict]) -> Path:
    return _adapter_run(wbc_small, vit_init, tmp_path_factory.mktemp("lora"), tiny_overrides, "lora",
                        **{"adapter.lora.rank": 4, "adapter.lora.targets": "qkv,proj,fc2"})


@pytest.mark.slow
def test_an_adapter_run_stores_a_small_checkpoint_and_records_its_trainable_parameters(
        lora_run: Path, vit_init: Path) -> None:
    from leukolab.checkpoints import load_checkpoint

    best = load_checkpoint(lora_run / "best.pt")
    record = best["adapter"]
    assert record["config"] == {"name": "lora", "rank": 4, "alpha": 16.0, "targets": ["qkv", "proj", "fc2"],
                                "dropout": 0.0}
    assert record["init"] == str(vit_init.resolve()) and best["backbone"] is None  # referenced, not stored
    assert not [k for k in best["objective"] if k.startswith("model.backbone.")]
    d = 192
    n_adapter = 2 * 4 * ((d + 3 * d) + (d + d) + (4 * d + d))
    assert record["adapter_params"] == n_adapter == sum(v.numel() for v in record["state"].values())
    assert (lora_run / "best.pt").stat().st_size < 0.2 * vit_init.stat().st_size
    history = pd.read_csv(lora_run / "history.csv")
    n_head = d * 5 + 5
    assert (history["trainable_params"] == n_adapter + n_head).all()
    total = n_adapter + n_head + record["backbone_params"]
    assert history["trainable_share"].iloc[-1] == pytest.approx((n_adapter + n_head) / total)
    assert history["adapter"].iloc[0] == "lora(rank=4, alpha=16.0, targets=qkv,proj,fc2, dropout=0.0)"


@pytest.mark.slow
def test_a_reloaded_adapter_run_reproduces_its_validation_loss_and_keeps_the_backbone_frozen(
        lora_run: Path, vit_init: Path) -> None:
    from leukolab.checkpoints import load_checkpoint
    from leukolab.data.readers import LabelledImages
    from leukolab.pipelines.classify import load_run, make_loader

    objective, _ = load_run(lora_run, torch.device("cpu"))
    frozen = load_checkpoint(vit_init)["backbone"]
    for k, v in objective.model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # training never touched the backbone
    splits = pd.read_csv(lora_run / "splits.csv")
    val = splits[splits["split"] == "val"]
    data = LabelledImages([Path(p) for p in val["path"]], list(val["label"]), objective.class_names)
    loader = make_loader(data, objective.class_names, 32, 64, train=False, cache=True)
    with torch.no_grad():
        row = objective.validation_epoch_end([objective.validation_step(b) for b in loader])
    history = pd.read_csv(lora_run / "history.csv")
    best = history.loc[history["val_balanced_accuracy"].idxmax()]
    assert row["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)  # best.pt's epoch, restored
    assert row["trainable_params"] == best["trainable_params"]


@pytest.mark.slow
def test_export_merge_folds_lora_into_a_plain_timm_backbone(lora_run: Path, vit_init: Path, tmp_path: Path) -> None:
    from leukolab.checkpoints import load_checkpoint
    from leukolab.cli.main import main
    from leukolab.models.loading import load_any_backbone

    out = tmp_path / "merged.pt"
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["backbone_spec"]["name"] == "vit_tiny_patch16_224" and ckpt["merged_adapter"]["name"] == "lora"
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2).eval()
    plain.load_state_dict(ckpt["backbone"], strict=True)  # timm names, nothing extra
    adapted = load_any_backbone(lora_run)  # embed/viz read the run with its adapter
    assert "lora adapter" in " ".join(adapted.notes)
    frozen = load_any_backbone(vit_init).model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted.model(x), atol=1e-5, rtol=0)
        assert not torch.allclose(plain(x), frozen(x), atol=1e-4)  # training moved the adapter off zero
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 2  # never overwrites


@pytest.mark.slow
def test_adapter_run_errors_are_one_line(
        wbc_small: Path, vit_init: Path, tiny_run: Path, tmp_path: Path, tiny_overrides: Callable[..., dict],
        capsys: pytest.CaptureFixture[str]) -> None:
    from leukolab.checkpoints import load_checkpoint, save_checkpoint
    from leukolab.cli.main import main
    from leukolab.pipelines.classify import load_run

    prompt_run = _adapter_run(wbc_small, vit_init, tmp_path / "p", tiny_overrides, "prompt",
                              **{"adapter.prompt.tokens": 2, "train.epochs": 1})
    for run, want in ((prompt_run, "trained with the prompt adapter; expected a run trained with --adapter lora"),
                      (tiny_run, "trained with no adapter; expected a run trained with --adapter lora")):
        assert main(["export", str(run), "--merge", "--out", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()
    assert main(["export", str(prompt_run), "--out", str(tmp_path / "x.pt")]) == 2
    assert "the prompt adapter cannot be folded into a plain backbone" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "plain.pt")]) == 0  # no adapter: as it is
    assert load_checkpoint(tmp_path / "plain.pt")["backbone"].keys() == load_checkpoint(tiny_run / "best.pt")[
        "backbone"].keys()
    base = ["train", str(wbc_small), "--out", str(tmp_path / "bad"), "--img-size", "32", "--epochs", "1"]
    for args, want in (
        (["--backbone", "resnet10t", "--adapter", "lora"], "needs a timm Vision Transformer backbone"),
        (["--init", str(vit_init), "--backbone", "vit_tiny_patch16", "--adapter", "lora", "--lora-targets", "q"],
         "'q' matches no linear layer of the ViT blocks; expected some of: attn.proj, attn.qkv, mlp.fc1, mlp.fc2"),
        (["--init", str(vit_init), "--backbone", "vit_tiny_patch16", "--adapter", "lora", "--lora-rank", "0"],
         "LoRA rank 0"),
        (["--init", str(vit_init), "--backbone", "vit_tiny_patch16", "--adapter", "prompt", "--prompt-tokens", "9"],
         "prompt tokens 9: expected a whole number from 1 to 4"),
        (["--backbone", "vit_tiny_patch16", "--adapter", "bottleneck", "--lora-rank", "4"],
         "--lora-rank applies to --adapter lora, not --adapter bottleneck"),
    ):
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()  # bad options leave no run folder behind
    # the frozen backbone is referenced by its --init file: a changed file is refused
    moved = tmp_path / "vit_changed.pt"
    state = load_checkpoint(vit_init)
    state["backbone"]["cls_token"] = state["backbone"]["cls_token"] + 1
    save_checkpoint(state, moved)
    best = load_checkpoint(prompt_run / "best.pt")
    best["adapter"]["init"] = str(moved)
    save_checkpoint(best, tmp_path / "edited.pt")
    with pytest.raises(LeukolabError, match="holds other weights than the adapter was trained on"):
        load_run(tmp_path / "edited.pt")


def test_a_classifier_with_an_adapter_references_its_frozen_backbone_in_state_dicts() -> None:
    from leukolab.models.classifier import Classifier

    def build() -> Classifier:
        model = Classifier(make_vit("plain"), nn.Linear(192, 3))
        model.attach_adapter("adaptformer", {"hidden": 4}, init="/somewhere/vit.pt")
        return model

    model = build()
    with torch.no_grad():
        for p in [*model.adapter.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    state = model.state_dict()
    assert state and not [k for k in state if k.startswith("backbone.")]  # the small file: adapter + head
    other = build()  # same frozen weights (seeded), other adapter
    other.load_state_dict(state, strict=True)  # the backbone keeps its weights; nothing is reported missing
    x = images(model.backbone)
    assert torch.equal(other.eval()(x), model.eval()(x))
    model.train()
    assert not model.backbone.training and model.adapter.training  # frozen backbone in eval mode, adapter trains
    with pytest.raises(LeukolabError, match="drop --freeze-backbone"):
        Classifier(make_vit("plain"), nn.Linear(192, 3), freeze_backbone=True).attach_adapter("lora", {})


def test_an_attached_adapter_travels_with_its_backbone() -> None:
    vit = make_vit("plain").eval()
    x = images(vit)
    adapter = apply_adapter(vit, "bottleneck", hidden=4, attach=True)  # e.g. a MIL encoder handed on as one module
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    want = vit(x)
    assert {n for n, p in vit.named_parameters() if p.requires_grad} == {
        f"adapter.{n}" for n, _ in adapter.named_parameters()}
    vit.to(torch.float64)  # moves (casts) the adapter with the backbone
    assert all(p.dtype == torch.float64 for p in adapter.parameters())
    torch.testing.assert_close(vit(x.double()).float(), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_an_interrupted_adapter_run_resumes_to_the_same_result(
        lora_run: Path, wbc_small: Path, vit_init: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        tiny_overrides: Callable[..., dict]) -> None:
    from leukolab.pipelines.classify import train_classifier
    from leukolab.training.loop import Trainer

    original = Trainer._end_epoch

    def crash_after_first(self: Trainer, row: dict) -> None:
        original(self, row)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):  # the same run as lora_run, stopped after its first epoch
        _adapter_run(wbc_small, vit_init, tmp_path, tiny_overrides, "lora",
                     **{"adapter.lora.rank": 4, "adapter.lora.targets": "qkv,proj,fc2"})
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    (broken,) = list(tmp_path.iterdir())
    train_classifier(resume=broken)  # last.pt holds no backbone: it comes from --init again
    full = pd.read_csv(lora_run / "history.csv").drop(columns="epoch_time_s")
    resumed = pd.read_csv(broken / "history.csv").drop(columns="epoch_time_s")
    pd.testing.assert_frame_equal(full, resumed, atol=1e-5, rtol=1e-4)
