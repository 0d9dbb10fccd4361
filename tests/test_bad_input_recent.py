"""Bad input to the most recent commands (detect export / --backend onnx / --mosaic, mil train --adapter,
embed on images without a cell): a one-line ``error:`` naming the value, exit status 2, nothing written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukolab.checkpoints import save_checkpoint
from leukolab.cli.main import main
from leukolab.errors import LeukolabError

torch.set_num_threads(1)

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def _cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *expected: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the refusals need, none of them a trained run: refusals happen before a run's weights matter."""
    root = tmp_path_factory.mktemp("bad-input")
    fields = root / "fields"
    fields.mkdir()
    Image.new("RGB", (64, 48), (200, 180, 190)).save(fields / "f.png")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "corrupt.onnx").write_bytes(b"\x08\x07junk")
    (root / "taken.onnx").write_bytes(b"keep me")
    return {
        "root": root, "fields": fields, "notes": root / "notes.txt", "corrupt": root / "corrupt.onnx",
        "taken": root / "taken.onnx", "classifier": save_checkpoint({"task": "classification"}, root / "cls.pt"),
        "detector": save_checkpoint({"task": "detection"}, root / "det.pt"),  # never loaded past the checks
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # detect export: what RUN is, and --out / --opset (checked before the run is loaded)
        (["export", "{classifier}", "--out", "{tmp}/m.onnx"], ["cls.pt is not a detection run"]),
        (["export", "{fields}", "--out", "{tmp}/m.onnx"], ["fields: no best.pt", "detect train run folder"]),
        (["export", "{notes}", "--out", "{tmp}/m.onnx"], ["notes.txt: not a torch.save file"]),
        (["export", "{corrupt}", "--out", "{tmp}/m.onnx"], ["corrupt.onnx is an ONNX file", "run folder"]),
        (["export", "{detector}", "--out", "{taken}"], ["taken.onnx exists", "never overwritten"]),
        (["export", "{detector}", "--out", "{tmp}/model.pt"], ["--out", "model.pt", "ending in .onnx"]),
        (["export", "{detector}", "--out", "{tmp}/m.onnx", "--opset", "9"], ["--opset 9", "from 11 to"]),
        (["export", "{detector}", "--out", "{tmp}/m.onnx", "--opset", "99"], ["--opset 99"]),
        # detect predict / evaluate: an .onnx file where the run belongs, a file that is no checkpoint, the backend
        (["predict", "{corrupt}", "{fields}", "--out", "{tmp}/p", "--backend", "onnx"],
         ["corrupt.onnx is an ONNX file"]),
        (["evaluate", "{corrupt}", "--backend", "onnx"], ["corrupt.onnx is an ONNX file"]),
        (["predict", "{notes}", "{fields}", "--out", "{tmp}/p"], ["cannot read checkpoint", "notes.txt"]),
        (["predict", "{detector}", "{fields}", "--out", "{tmp}/p", "--backend", "foo"],
         ["--backend 'foo'", "torch, onnx"]),
        # detect train --mosaic: a probability
        (["train", "{fields}", "--out", "{tmp}/runs", "--mosaic", "1.5"], ["--mosaic 1.5", "[0, 1]"]),
        (["train", "{fields}", "--out", "{tmp}/runs", "--mosaic", "-0.1"], ["--mosaic -0.1", "[0, 1]"]),
        (["train", "{fields}", "--out", "{tmp}/runs", "--mosaic", "nan"], ["--mosaic nan", "[0, 1]"]),
        (["train", "{fields}", "--out", "{tmp}/runs", "--mosaic", "often"], ["'--mosaic'", "valid number"]),
    ],
)
def test_detect_bad_input(args: list[str], expected: list[str], inputs: dict[str, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    values = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path)}
    code, _, err = _cli(["detect", *(a.format(**values) for a in args)], capsys)
    _one_line_error(code, err, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no run folder started
    assert inputs["taken"].read_bytes() == b"keep me"


def test_backend_onnx_without_onnxruntime(inputs: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    for args in (["predict", inputs["detector"], inputs["fields"], "--out", tmp_path / "p"], ["evaluate",
                                                                                           inputs["detector"]]):
        code, _, err = _cli(["detect", *args, "--backend", "onnx"], capsys)
        _one_line_error(code, err, "onnxruntime", "pip install 'leukolab[onnx]'")
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(not HAVE_ONNX, reason="onnxruntime / onnx not installed (pip install 'leukolab[onnx]')")
def test_an_onnx_model_of_another_detector_is_refused(tmp_path: Path) -> None:
    from leukolab.models.detection import CenterNet
    from leukolab.models.detection_onnx import OnnxDetector, export_onnx

    torch.manual_seed(0)
    three = CenterNet(3, backbone="resnet10t", channels=8).eval()
    two = CenterNet(2, backbone="resnet10t", channels=8).eval()
    path = tmp_path / "three.onnx"
    path.write_bytes(export_onnx(three, (64, 64)))
    OnnxDetector(three, path, threads=1)  # its own model loads
    with pytest.raises(LeukolabError, match=r"three\.onnx: exported from another model \(num_classes 3, this run's 2"):
        OnnxDetector(two, path, threads=1)
    with pytest.raises(LeukolabError, match="not a loadable ONNX model"):
        OnnxDetector(three, b"\x08\x07junk", threads=1)
    with pytest.raises(LeukolabError, match="--opset 7: expected an ONNX opset from 11"):
        export_onnx(three, (64, 64), opset=7)


# --------------------------------------------------------------------------- mil train
@pytest.fixture(scope="module")
def mil_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 tiny patients and a 2-block ViT-Tiny encoder file at 32 px (the adapter tests' own helpers)."""
    from leukolab.data.synthetic.patients import make_patients
    from test_mil_adapter import TINY, _vit_file

    root = tmp_path_factory.mktemp("mil-bad")
    return {"bags": make_patients(root / "bags", TINY, progress=False), "vit": _vit_file(root / "vit.pt")}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--finetune-encoder", "--adapter", "loraa"], ["unknown adapter 'loraa'", "lora, prompt"]),
        (["--adapter", "lora"], ["--adapter lora", "--finetune-encoder"]),
        (["--finetune-encoder", "--cells-per-bag", "0"], ["--cells-per-bag 0", ">= 1"]),
        (["--finetune-encoder", "--cells-per-bag", "-3"], ["--cells-per-bag -3", ">= 1"]),
        (["--cells-per-bag", "4"], ["--cells-per-bag 4", "--finetune-encoder"]),
        (["--lora-rank", "4"], ["--lora-rank applies to --adapter lora", "--finetune-encoder --adapter lora"]),
        (["--finetune-encoder", "--prompt-tokens", "4"], ["--prompt-tokens applies to --adapter prompt"]),
        (["--finetune-encoder", "--adapter", "prompt", "--lora-rank", "4"], ["--lora-rank", "not --adapter prompt"]),
        (["--finetune-encoder", "--adapter", "lora", "--lora-rank", "0"], ["LoRA rank 0", "> 0"]),
        (["--finetune-encoder", "--adapter", "lora", "--lora-alpha", "0"], ["LoRA alpha 0.0", "> 0"]),
        (["--finetune-encoder", "--adapter", "lora", "--lora-targets", "qkvv"], ["LoRA target 'qkvv'"]),
        (["--finetune-encoder", "--adapter", "prompt", "--prompt-tokens", "0"], ["prompt tokens 0"]),
    ],
)
def test_mil_adapter_bad_input(args: list[str], expected: list[str], mil_inputs: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["mil", "train", mil_inputs["bags"], "--encoder", mil_inputs["vit"], "--out", tmp_path / "runs",
                         "--epochs", "1", "--no-progress", *args], capsys)
    _one_line_error(code, err, *expected)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no half-made run


# --------------------------------------------------------------------------- embed: no cell found
def test_embed_of_a_cell_crop_run_on_images_without_a_cell(tmp_path_factory: pytest.TempPathFactory,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from leukolab.evaluation.features import load_features
    from test_robust_pipeline import train_cell_crop_run

    run = train_cell_crop_run(tmp_path_factory)
    blank = tmp_path_factory.mktemp("blank") / "images"
    blank.mkdir()
    for name, value in (("white", 255), ("grey", 128), ("black", 0)):  # the estimated mask is empty in each
        Image.new("RGB", (32, 32), (value,) * 3).save(blank / f"{name}.png")
    out = blank.parent / "feats.npz"
    code, stdout, err = _cli(["embed", run, blank, "--out", out, "--no-progress"], capsys)
    assert code == 0 and "3 rows" in stdout, err
    # one summary note, not Python's warning text with a source line
    assert "3 image(s) had no cell found by the run's cell crop; used whole" in err
    assert "UserWarning" not in err and "Traceback" not in err
    feats = load_features(out)
    assert feats.features.shape[0] == 3 and np.isfinite(feats.features).all()
    code, _, err = _cli(["embed", run, blank, "--out", out, "--no-progress"], capsys)
    _one_line_error(code, err, "feats.npz")  # the features file is never overwritten
    # predict: the same one count line, without Python's warning text
    code, _, err = _cli(["predict", run, blank, "--out", blank.parent / "pred.csv"], capsys)
    assert code == 0 and "no cell found in 3 image(s); they were classified whole" in err, err
    assert "UserWarning" not in err and err.count("no cell found") == 1, err


@pytest.mark.parametrize("args, expected", [
    (["--lora-rank", "4"], "--lora-rank applies to --adapter lora; expected it with --adapter lora"),
    (["--adapter", "prompt", "--lora-alpha", "2"], "--lora-alpha applies to --adapter lora, not --adapter prompt"),
    (["--adapter", "lora", "--prompt-shallow"], "--prompt-deep applies to --adapter prompt, not --adapter lora"),
])
def test_train_adapter_options_need_their_adapter(tmp_path, capsys, args, expected):
    """`leukolab train` shares `mil train`'s adapter options and their checks (cli/app.py AdapterOptions)."""
    code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert not (tmp_path / "runs").exists()


def test_adapter_options_overrides_keys():
    """The shared options map onto both commands' config keys, unset ones as None (left to the merge)."""
    from leukolab.cli.app import AdapterOptions

    got = AdapterOptions(lora_rank=4, prompt_deep=False).overrides("encoder.adapter_kwargs")
    assert got == {"encoder.adapter_kwargs.lora.rank": 4, "encoder.adapter_kwargs.lora.alpha": None,
                   "encoder.adapter_kwargs.lora.targets": None, "encoder.adapter_kwargs.prompt.tokens": None,
                   "encoder.adapter_kwargs.prompt.deep": False}
