"""``leukolab report``: one self-contained HTML page per run, or a comparison of several."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import leukolab.cli.cmd_embed  # noqa: F401 - registers the commands
from leukolab.cli.main import main
from leukolab.evaluation.report import collect_run, markdown_to_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, value])
    fig.savefig(path, dpi=30)
    plt.close(fig)
    return path


def fake_run(root: Path, accuracy: float, backbone: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"seed: 3\nmodel:\n  backbone: {backbone}\ndata:\n  img_size: 32\n")
    (root / "history.csv").write_text("epoch,loss,val_loss,val_balanced_accuracy\n1,1.2,1.1,0.41\n2,0.9,0.8,0.66\n")
    _png(root / "curves.png", 1.0)
    metrics = {"n": 77, "accuracy": accuracy, "balanced_accuracy": 0.6543, "f1_macro": 0.6,
               "per_class": {"basophil": {"precision": 0.5, "recall": 0.25, "f1": 0.3333, "support": 4}},
               "confusion_matrix": [[1, 3], [0, 4]], "class_names": ["basophil", "monocyte"]}
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    _png(root / "eval" / "confusion_matrix.png", 2.0)
    (root / "feats-probe").mkdir()
    (root / "feats-probe" / "probe.md").write_text(
        "# Probes\n\n| method | accuracy |\n| --- | ---: |\n| 1-NN | 71.5 (± 2.0) |\n| linear probe | 88.2 |\n"
    )
    _png(root / "att" / "cell_attention.png", 3.0)
    _png(root / "reconstructions.png", 4.0)
    _png(root / "checkpoints" / "ignored.png", 5.0)  # never searched
    _png(root / "data" / "basophil" / "cell.png", 6.0)  # image data, not a figure
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_single_run_report_embeds_everything(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "run-a", 0.8123, "vit_tiny_patch16")
    art = collect_run(run)
    kinds = [kind for kind, _ in art.images]
    assert kinds == ["curves", "confusion matrix", "attention", "reconstructions"]
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    images = _images(page)
    assert len(images) == 4 and all(img.startswith(PNG_MAGIC) for img in images)
    for text in ("0.8123", "0.6543", "backbone: vit_tiny_patch16", "<td>linear probe</td>", "88.2", "basophil",
                 "reconstructions.png", "att/cell_attention.png", "best val_balanced_accuracy: 0.6600"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page
    # never overwritten
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and len(err.splitlines()) == 1


def test_comparison_page(tmp_path: Path, capsys) -> None:
    a = fake_run(tmp_path / "run-a", 0.8123, "vit_tiny_patch16")
    b = fake_run(tmp_path / "run-b", 0.4567, "resnet18")
    out = tmp_path / "cmp" / "comparison.html"
    assert main(["report", str(a), str(b), "--out", str(out), "--title", "two runs"]) == 0
    page = out.read_text()
    summary = page.split("<h2>summary</h2>")[1].split("</table>")[0]
    assert "run-a" in summary and "run-b" in summary and "0.8123" in summary and "0.4567" in summary
    assert "resnet18" in summary and "<title>two runs</title>" in page
    assert len(_images(page)) == 8


def test_report_errors(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, expected in [([str(empty)], "nothing to report"), ([str(tmp_path / "nope")], "does not exist"),
                           ([str(empty), "--out", str(tmp_path / "r.txt")], "expected an .html file")]:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1


def test_markdown_to_html_escapes_and_builds_tables() -> None:
    text = "# Title <b>\n\nsome *text* & more\n\n| a | b \\| c |\n| --- | ---: |\n| <x> | 1.0 |\n"
    out = markdown_to_html(text)
    assert "<h4>Title &lt;b&gt;</h4>" in out
    assert "<th>b | c</th>" in out and "<td>&lt;x&gt;</td>" in out
    assert "&amp; more" in out


def test_an_experiment_figure_comes_before_its_cells_figures(tmp_path: Path) -> None:
    from PIL import Image

    exp = tmp_path / "exp"
    for i in range(5):
        (exp / "runs" / f"cell{i}").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(exp / "runs" / f"cell{i}" / "curves.png")
    Image.new("RGB", (4, 4)).save(exp / "label_efficiency.png")
    (exp / "label_efficiency.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    art = collect_run(exp, max_images=2)
    assert [p.name for _, p in art.images] == ["label_efficiency.png", "curves.png"]
