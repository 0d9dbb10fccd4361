"""Embeddings, probes from the CLI, attention maps, PCA / 2-D maps, conversion: tiny ViTs, tiny data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from leukolab.checkpoints import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from leukolab.cli.main import main
from leukolab.data.embed import collect_sources, load_image_batch
from leukolab.data.synthetic import make_wbc_dataset
from leukolab.data.transforms import denormalise
from leukolab.errors import LeukolabError
from leukolab.evaluation.attention import attention_maps, attention_weights, last_block_attention, pca_rgb
from leukolab.evaluation.features import FeatureSet, load_features, save_features
from leukolab.models.loading import load_any_backbone
from leukolab.models.tokens import pool_features

VIT = "vit_tiny_patch16_224"
KW = {"patch_size": 8, "depth": 2, "reg_tokens": 2}
N_PER_CLASS = 6


def tiny_vit(**extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(VIT, pretrained=False, num_classes=0, img_size=32, **{**KW, **extra}).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    model = tiny_vit()
    sd = model.state_dict()
    torch.save({"backbone": sd, "backbone_name": VIT, "img_size": 32, "backbone_kwargs": KW}, root / "pre.pt")
    torch.save(
        {"config": {"model": {"backbone": VIT, "backbone_kwargs": KW}, "data": {"img_size": 32}},
         "backbone": sd, "task": "classification", "class_names": ["a", "b"]},
        root / "cls.pt",
    )
    torch.save(sd, root / "raw.pth")
    data = make_wbc_dataset(root / "d", N_PER_CLASS, size=32, seed=0, progress=False)
    return {"root": root, "pre": root / "pre.pt", "cls": root / "cls.pt", "raw": root / "raw.pth", "data": data}


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


# ----------------------------------------------------------------------------- loading and embedding


def test_every_checkpoint_layout_gives_the_same_backbone(files: dict[str, Path], capsys) -> None:
    conv = files["root"] / "conv.pt"
    code, out, _ = run_cli(["convert", files["raw"], "--img-size", 32, "--out", conv], capsys)
    assert code == 0 and "mapped" in out and conv.is_file()
    x = load_image_batch(sorted((files["data"] / "monocyte").glob("*.png"))[:2], 32)
    ref = None
    for path, img_size, kind in [(files["pre"], None, "pretrain"), (files["cls"], None, "classification"),
                                 (conv, None, "converted"), (files["raw"], 32, "raw")]:
        loaded = load_any_backbone(path, img_size)
        assert loaded.img_size == 32 and loaded.kind == kind and loaded.vit and loaded.num_reg_tokens == 2
        with torch.no_grad():
            emb = pool_features(loaded.model, x, "both")
        ref = emb if ref is None else ref
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # another image size: position embedding resampled, still a working model
    loaded = load_any_backbone(files["pre"], 48)
    assert loaded.img_size == 48 and loaded.model.patch_embed.grid_size == (6, 6) and loaded.notes


def test_external_weights_get_imagenet_normalisation(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    conv = tmp_path / "conv.pt"
    assert run_cli(["convert", files["raw"], "--img-size", 32, "--out", conv], capsys)[0] == 0
    expected = {files["pre"]: "leukolab", files["cls"]: "leukolab", conv: "imagenet", files["raw"]: "imagenet"}
    for path, norm in expected.items():
        assert load_any_backbone(path, 32).normalisation == norm
    assert load_any_backbone(conv, 32, norm="leukolab").normalisation == "leukolab"
    paths = sorted((files["data"] / "monocyte").glob("*.png"))[:2]
    a, b = load_image_batch(paths, 32), load_image_batch(paths, 32, "imagenet")
    assert not torch.allclose(a, b)
    torch.testing.assert_close(denormalise(a[0]), denormalise(b[0], "imagenet"), atol=1e-5, rtol=0)
    out = tmp_path / "f.npz"
    code, stdout, err = run_cli(["embed", conv, files["data"], "--out", out, "--no-progress"], capsys)
    assert code == 0 and "imagenet normalisation" in stdout, err
    code, _, err = run_cli(["embed", conv, files["data"], "--out", tmp_path / "g.npz", "--norm", "imagenett",
                            "--no-progress"], capsys)
    assert code == 2 and "imagenett" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("pool", "dim", "suffix"), [("cls", 192, ".npz"), ("mean", 192, ".parquet"),
                                                     ("both", 384, ".npz")])
def test_embed_writes_one_row_per_image(files: dict[str, Path], tmp_path: Path, capsys, pool, dim, suffix) -> None:
    out = tmp_path / f"feats{suffix}"
    code, stdout, err = run_cli(["embed", files["pre"], files["data"], "--out", out, "--pool", pool,
                                 "--batch-size", 16, "--no-progress"], capsys)
    assert code == 0, err
    assert f"{5 * N_PER_CLASS} rows x {dim} dims" in stdout
    fs = load_features(out)
    assert fs.features.shape == (5 * N_PER_CLASS, dim) and np.isfinite(fs.features).all()
    assert sorted(set(fs.labels)) == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert set(fs.extra["source"]) == {files["data"].name}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in fs.paths)
    assert all(Path(p).parent.name == label for p, label in zip(fs.paths, fs.labels, strict=True))
    if pool == "both":  # cls half and mean half match the single poolings
        model = load_any_backbone(files["pre"]).model
        x = load_image_batch(fs.paths[:3], 32)
        with torch.no_grad():
            tokens = model.forward_features(x)
        np.testing.assert_allclose(fs.features[:3, :192], tokens[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(fs.features[:3, 192:], tokens[:, 3:].mean(1).numpy(), atol=1e-5)
    # never overwritten
    code, _, err = run_cli(["embed", files["pre"], files["data"], "--out", out, "--no-progress"], capsys)
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1


def test_embed_random_init_keeps_the_architecture_but_not_the_weights(
    files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    outs = {}
    for name, extra in (("loaded", []), ("random", ["--random-init"]), ("random2", ["--random-init"])):
        outs[name] = tmp_path / f"{name}.npz"
        code, stdout, err = run_cli(["embed", files["pre"], files["data"], "--out", outs[name], "--no-progress",
                                     *extra], capsys)
        assert code == 0, err
    loaded, random, random2 = (load_features(outs[k]).features for k in ("loaded", "random", "random2"))
    assert loaded.shape == random.shape
    assert np.abs(loaded - random).max() > 1e-3  # other weights
    np.testing.assert_array_equal(random, random2)  # same seed, same random backbone
    assert "random init" in stdout


def test_embed_layer_and_final_norm_pick_the_tokens(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    model = load_any_backbone(files["pre"]).model
    x = load_image_batch(sorted((files["data"] / "basophil").glob("*.png"))[:3], 32)
    with torch.no_grad():
        tokens = model.patch_drop(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        after0 = model.blocks[0](tokens)
        last = pool_features(model, x, "both")
        np.testing.assert_allclose(pool_features(model, x, "both", layer=1, final_norm=True), last, atol=1e-6)
        raw0 = pool_features(model, x, "both", layer=0, final_norm=False)
        np.testing.assert_allclose(raw0[:, :192], after0[:, 0], atol=1e-5)  # class token after block 0
        np.testing.assert_allclose(raw0[:, 192:], after0[:, 3:].mean(1), atol=1e-5)  # patches (registers skipped)
        raw_last = pool_features(model, x, "cls", layer=-1, final_norm=False)
        np.testing.assert_allclose(model.norm(raw_last), last[:, :192], atol=1e-5)
    out = tmp_path / "b0.npz"
    code, stdout, err = run_cli(["embed", files["pre"], files["data"], "--out", out, "--layer", 0,
                                 "--no-final-norm", "--no-progress"], capsys)
    assert code == 0, err
    assert "of block 0 (no final norm)" in stdout
    assert load_features(out).features.shape == (5 * N_PER_CLASS, 192)


def test_embed_unlabelled_folder_and_several_sources(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "u.npz"
    flat = files["data"] / "basophil"
    code, _, err = run_cli(["embed", files["pre"], flat, files["data"] / "monocyte", "--out", out,
                            "--no-progress"], capsys)
    assert code == 0, err
    fs = load_features(out)
    assert fs.labels is None and len(fs) == 2 * N_PER_CLASS
    assert fs.extra["source"].tolist() == ["basophil"] * N_PER_CLASS + ["monocyte"] * N_PER_CLASS


def test_csv_sources_labelled_unlabelled_and_split(files: dict[str, Path], tmp_path: Path) -> None:
    images = sorted((files["data"] / "lymphocyte").glob("*.png"))[:4]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "sub").mkdir()
    for p in images:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    plain = tmp_path / "sub" / "plain.csv"  # paths only, relative to the CSV's folder: unlabelled
    pd.DataFrame({"path": [f"../imgs/{p.name}" for p in images]}).to_csv(plain, index=False)
    split = tmp_path / "split.csv"
    pd.DataFrame({"path": [str(p) for p in images], "label": ["x", "y", "x", "y"],
                  "split": ["train", "train", "test", "test"]}).to_csv(split, index=False)
    table = collect_sources(plain)
    assert table.labels is None and [p.resolve() for p in table.paths] == [tmp_path / "imgs" / p.name for p in images]
    assert table.extra["source"].tolist() == ["plain"] * 4
    table = collect_sources([split, files["data"] / "basophil"], labels=True)
    assert table.labels is None  # one source is unlabelled, so the whole set is
    table = collect_sources([split, files["data"]])
    assert table.labels is not None and table.labels[:4] == ["x", "y", "x", "y"]
    assert table.extra["split"].tolist() == ["train", "train", "test", "test"] + ["all"] * 5 * N_PER_CLASS
    assert table.extra["source"].tolist()[:5] == ["split"] * 4 + [files["data"].name]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(LeukolabError, match=r"missing column\(s\) path; expected columns path\[,label"):
        collect_sources(bad)


def test_backbone_spec_gives_the_input_normalisation(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    sd = tiny_vit().state_dict()
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.3, 0.25)
    for name, m, s in (("imnet", IMAGENET_MEAN, IMAGENET_STD), ("own", mean, std)):
        spec = BackboneSpec(VIT, dict(KW), img_size=32, patch_size=8, mean=m, std=s)
        torch.save({"backbone": sd, "backbone_spec": spec.to_dict(), "task": "pretrain-mae"}, tmp_path / f"{name}.pt")
    assert load_any_backbone(tmp_path / "imnet.pt").normalisation == "imagenet"
    loaded = load_any_backbone(tmp_path / "own.pt")
    assert loaded.kind == "pretrain-mae" and loaded.img_size == 32 and loaded.num_reg_tokens == 2
    assert loaded.normalisation == (mean, std)
    out = tmp_path / "own.npz"
    code, stdout, err = run_cli(["embed", tmp_path / "own.pt", files["data"] / "basophil", "--out", out,
                                 "--no-progress"], capsys)
    assert code == 0, err
    assert "mean (0.6, 0.5, 0.4) std (0.2, 0.3, 0.25) normalisation" in stdout
    fs = load_features(out)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                          for p in fs.paths[:3]]).float() / 255
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = pool_features(loaded.model, x, "cls")
    np.testing.assert_allclose(fs.features[:3], expected.numpy(), atol=1e-4)
    # --norm still wins over the checkpoint's statistics
    assert load_any_backbone(tmp_path / "own.pt", norm="leukolab").normalisation == "leukolab"


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True}])
def test_attention_maps_shape_rows_and_match_timm(extra: dict[str, object]) -> None:
    model = tiny_vit(**extra)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    heads = model.blocks[-1].attn.num_heads
    assert maps.shape == (2, 1 + 2, heads, 4, 4)
    weights, inp = last_block_attention(model, x)
    assert weights.shape == (2, heads, 3 + 16, 3 + 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 19))
    # the maps are the patch part of the prefix rows: patch share + prefix share = 1
    prefix_share = weights[:, :, :3, :3].sum(-1).permute(0, 2, 1)
    torch.testing.assert_close(maps.sum((-1, -2)) + prefix_share, torch.ones(2, 3, heads))
    # the recomputed weights reproduce timm's own (fused) attention output
    attn = model.blocks[-1].attn
    B, N, C = inp.shape
    v = attn.qkv(inp).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)[2]
    ours = attn.proj((attention_weights(attn, inp) @ v).transpose(1, 2).reshape(B, N, C))
    with torch.no_grad():
        torch.testing.assert_close(ours, attn(inp), atol=1e-5, rtol=1e-5)


def test_pca_rgb_and_cls_free_models() -> None:
    feats = torch.randn(3, 4, 4, 16)
    rgb, mask = pca_rgb(feats, 0.5)
    assert rgb.shape == (3, 4, 4, 3) and mask.shape == (3, 4, 4)
    assert rgb.min() >= 0 and rgb.max() <= 1 and (rgb[~mask] == 0).all()
    rgb_all, mask_all = pca_rgb(feats, None)
    assert mask_all.all() and rgb_all.max() == pytest.approx(1.0)
    model = tiny_vit(class_token=False, reg_tokens=0, global_pool="avg")
    with pytest.raises(Exception, match="no class or register tokens"):
        attention_maps(model, torch.randn(1, 3, 32, 32))


def test_viz_commands_write_valid_pngs(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    images = sorted((files["data"] / "eosinophil").glob("*.png"))[:2]
    code, _, err = run_cli(["viz", "attention", files["pre"], *images, "--out", tmp_path / "att"], capsys)
    assert code == 0, err
    pngs = sorted((tmp_path / "att").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i.stem}_attention.png" for i in images]
    for p in pngs:
        assert_png(p)
    code, _, err = run_cli(["viz", "pca", files["cls"], files["data"] / "lymphocyte", "--out",
                            tmp_path / "pca.png", "--limit", 4], capsys)
    assert code == 0, err
    assert_png(tmp_path / "pca.png")

    feats = tmp_path / "f.npz"
    rng = np.random.default_rng(0)
    save_features(FeatureSet(rng.normal(size=(12, 8)), [f"/img/{i}.png" for i in range(12)],
                             ["a", "b", "c"] * 4, pd.DataFrame({"source": ["x"] * 6 + ["y"] * 6})), feats)
    for method in ("pca",):  # t-SNE works the same way but takes seconds
        code, _, err = run_cli(["viz", "umap", feats, "--method", method, "--color-by", "source"], capsys)
        assert code == 0, err
        assert_png(tmp_path / f"f-{method}-map.png")
        page = (tmp_path / f"f-{method}-map.html").read_text()
        assert "<svg" in page and "/img/11.png" in page and "label: c" in page
        assert "http://" not in page and "https://" not in page
    if importlib.util.find_spec("umap") is None:
        code, _, err = run_cli(["viz", "umap", feats, "--out", tmp_path / "u.png"], capsys)
        assert code == 2 and err == (
            "error: umap-learn is not installed; pip install 'leukolab[umap]' (or use --method pca or --method tsne)"
        )


# ----------------------------------------------------------------------------- probe


def test_probe_cli_prints_table_and_writes_files(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 10)
    x = rng.normal(size=(30, 6))
    x[labels == "a", 0] += 3
    x[labels == "b", 1] += 3
    split = np.tile(["train", "train", "test"], 10)
    feats = tmp_path / "emb.npz"
    save_features(FeatureSet(x, [f"{i}.png" for i in range(30)], labels.tolist(),
                             pd.DataFrame({"split": split})), feats)
    code, out, err = run_cli(["probe", feats, "--folds", 3, "--seed", 1, "--no-progress"], capsys)
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "1-NN", "20-NN", "linear probe"]
    folder = tmp_path / "emb-probe"
    per_fold = pd.read_csv(folder / "probe.csv")
    assert len(per_fold) == 3 * 3 and set(per_fold["fold"]) == {0, 1, 2}
    assert "| linear probe |" in (folder / "probe.md").read_text()
    summary = pd.read_csv(folder / "probe_summary.csv", index_col="method")
    assert summary.index.tolist() == ["1-NN", "20-NN", "linear probe"]
    # a fixed split from the split column; the folder is uniquified
    code, out, err = run_cli(["probe", feats, "--train", "train", "--test", "test", "--no-progress"], capsys)
    assert code == 0, err
    fixed = pd.read_csv(tmp_path / "emb-probe-2" / "probe.csv")
    assert fixed["n_train"].eq(20).all() and fixed["n_test"].eq(10).all()


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_inputs(files: dict[str, Path]) -> dict[str, Path]:
    root = files["root"]
    unlabelled = root / "unlabelled.npz"
    save_features(FeatureSet(np.zeros((4, 3)), [f"{i}.png" for i in range(4)]), unlabelled)
    few = root / "few.npz"
    save_features(FeatureSet(np.random.default_rng(0).normal(size=(6, 3)), [f"{i}.png" for i in range(6)],
                             ["a", "b"] * 3), few)
    torch.save({"weird": torch.zeros(3)}, root / "weird.pt")
    from leukolab.models.backbones import create_backbone

    cnn = create_backbone("resnet10t", 32)
    torch.save({"backbone": cnn.state_dict(), "backbone_name": "resnet10t", "img_size": 32}, root / "cnn.pt")
    return {"unlabelled": unlabelled, "few": few, "weird": root / "weird.pt", "cnn": root / "cnn.pt"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["probe", "{unlabelled}"], "no labels"),
        (["probe", "{few}", "--folds", "5"], "fewer than folds=5"),
        (["probe", "{few}", "--train", "{few}"], "give both --train and --test"),
        (["probe", "{root}/missing.npz"], "does not exist"),
        (["embed", "{pre}", "{data}", "--out", "{tmp}/a.npz", "--img-size", "36"], "not a multiple"),
        (["embed", "{weird}", "{data}", "--out", "{tmp}/a.npz"], "unknown checkpoint layout"),
        (["embed", "{pre}", "{data}", "--out", "{tmp}/a.csv"], "expected .npz or .parquet"),
        (["embed", "{pre}", "{data}", "--out", "{tmp}/a.npz", "--pool", "max"], "--pool 'max'"),
        (["embed", "{pre}", "{data}", "--out", "{tmp}/a.npz", "--layer", "2"], "--layer 2: this ViT has 2 blocks"),
        (["viz", "attention", "{cnn}", "{data}/basophil", "--out", "{tmp}/att"], "needs a Vision Transformer"),
        (["viz", "pca", "{pre}", "{root}/nothing.png", "--out", "{tmp}/p.png"], "nothing.png does not exist"),
        (["viz", "umap", "{unlabelled}", "--method", "pca", "--out", "{tmp}/u.png"], "have no labels"),
        (["viz", "umap", "{few}", "--method", "mds"], "--method 'mds'"),
        (["convert", "{raw}", "--img-size", "30", "--out", "{tmp}/c.pt"], "not a multiple"),
        (["convert", "{raw}", "--format", "onnx", "--out", "{tmp}/c.pt"], "unknown checkpoint format"),
        (["convert", "{raw}", "--img-size", "32", "--release", "dinov2_vits15", "--out", "{tmp}/c.pt"],
         "unknown release 'dinov2_vits15'"),
        (["convert", "{raw}", "--img-size", "32", "--release", "dinobloom_s", "--out", "{tmp}/c.pt"],
         "architecture differs"),
        (["report", "{root}/no-run"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(files, bad_inputs, tmp_path, capsys, args, expected) -> None:
    names = {**{k: str(v) for k, v in files.items()}, **{k: str(v) for k, v in bad_inputs.items()},
             "tmp": str(tmp_path)}
    args = [a.format(**names) for a in args]
    code, _, err = run_cli([*args, "--no-progress"] if args[0] in ("embed", "probe") else args, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert expected in err
