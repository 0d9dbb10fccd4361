"""``leukolab report``: one self-contained HTML page per run, or a comparison of several."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from leukolab.cli.main import main
from leukolab.evaluation.manifest import read_manifest, record
from leukolab.evaluation.metrics import classification_metrics, write_metrics
from leukolab.evaluation.plots import plot_confusion_matrix, plot_curves, save_figure
from leukolab.evaluation.probe import write_probe_tables
from leukolab.evaluation.report import collect_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY = "epoch,loss,val_loss,val_balanced_accuracy\n1,1.2,1.1,0.41\n2,0.9,0.8,0.66\n"


def _figure(value: float) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, value])
    return fig


def _png(path: Path, value: float) -> Path:
    """A figure written the old way (no manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(value)
    fig.savefig(path, dpi=30)
    plt.close(fig)
    return path


def _probe_results() -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "fold": f, "accuracy": a, "balanced_accuracy": a, "f1_macro": a,
                          "f1_weighted": a, "precision_macro": a, "recall_macro": a}
                         for m, f, a in (("1-NN", 0, 0.70), ("1-NN", 1, 0.73), ("linear probe", 0, 0.882),
                                         ("linear probe", 1, 0.882))])


def old_run(root: Path, accuracy: float, backbone: str) -> Path:
    """A run folder as an older leukolab left it: fixed file names, no artefacts.json."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"seed: 3\nmodel:\n  backbone: {backbone}\ndata:\n  img_size: 32\n")
    (root / "history.csv").write_text(HISTORY)
    _png(root / "curves.png", 1.0)
    metrics = {"n": 77, "accuracy": accuracy, "balanced_accuracy": 0.6543, "f1_macro": 0.6,
               "per_class": {"basophil": {"precision": 0.5, "recall": 0.25, "f1": 0.3333, "support": 4}},
               "confusion_matrix": [[1, 3], [0, 4]], "class_names": ["basophil", "monocyte"]}
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    _png(root / "eval" / "confusion_matrix.png", 2.0)
    (root / "feats-probe").mkdir()
    _probe_results().to_csv(root / "feats-probe" / "probe.csv", index=False)
    (root / "feats-probe" / "probe.md").write_text("| method | accuracy |\n| --- | ---: |\n| 1-NN | 12.3456 |\n")
    _png(root / "reconstructions.png", 4.0)
    _png(root / "att" / "cell_attention.png", 3.0)  # a folder with no known file: not an output folder
    _png(root / "checkpoints" / "ignored.png", 5.0)  # never searched
    _png(root / "data" / "basophil" / "cell.png", 6.0)  # image data, not a figure
    return root


def new_run(root: Path) -> Path:
    """A run folder written through the evaluation writers: each folder lists its artefacts."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("seed: 1\nmodel:\n  backbone: vit_small\n")  # written below evaluation
    (root / "history.csv").write_text(HISTORY)
    plot_curves(pd.read_csv(root / "history.csv"), root / "curves.png")
    _png(root / "reconstructions.png", 4.0)  # drawn by an objective, which cannot record it
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], ["basophil", "monocyte"])
    write_metrics(m, root / "eval" / "metrics.json", title="test split")
    plot_confusion_matrix(m["confusion_matrix"], m["class_names"], root / "eval" / "confusion_matrix.png")
    write_probe_tables(_probe_results(), root / "feats-probe")
    save_figure(_figure(3.0), root / "att" / "cell_attention.png", "attention of the class token", dpi=30)
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_a_run_without_manifests_is_reported_from_its_fixed_file_names(tmp_path: Path, capsys) -> None:
    run = old_run(tmp_path / "run-a", 0.8123, "vit_tiny_patch16")
    art = collect_run(run)
    assert [i.path.relative_to(art.root).as_posix() for i in art.images] == [
        "curves.png", "reconstructions.png", "eval/confusion_matrix.png"]
    assert [f.folder.name for f in art.folders] == ["run-a", "eval", "feats-probe"]
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(PNG_MAGIC) for img in images)
    for text in ("0.8123", "0.6543", "backbone: vit_tiny_patch16", "basophil", "eval/metrics.json",
                 "best val_balanced_accuracy: 0.6600",
                 "<td>linear probe</td><td>88.2 (± 0.0)</td>", "<td>1-NN</td><td>71.5 (± 2.1)</td>"):  # probe.csv
        assert text in page, text
    assert "12.3456" not in page  # markdown is never parsed
    assert "http://" not in page and "https://" not in page
    # the page is listed in the run folder's (new) manifest and never overwritten
    assert [(a.path, a.kind) for a in read_manifest(run)] == [("report.html", "html")]
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and len(err.splitlines()) == 1


def test_a_run_is_reported_from_its_manifests(tmp_path: Path) -> None:
    run = new_run(tmp_path / "run-b")
    art = collect_run(run)
    titles = [(i.title, i.path.relative_to(art.root).as_posix(), i.listed) for i in art.images]
    assert titles == [("training curves", "curves.png", True), ("reconstructions", "reconstructions.png", False),
                      ("attention of the class token", "att/cell_attention.png", True),
                      ("confusion matrix", "eval/confusion_matrix.png", True)]
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert len(_images(page)) == 4
    for text in ("test split", "eval/metrics.json", "<td>0.8000</td>",  # accuracy 4/5 from the JSON written
                 "probes: metrics in percent, mean (± std over 2 folds)", "<td>1-NN</td><td>71.5 (± 2.1)</td>",
                 "probe results, one row per method and fold", "backbone: vit_small", "training history"):
        assert text in page, text
    assert page.index("run folder") < page.index("att/cell_attention.png") < page.index("eval/metrics.json")


def test_comparison_page(tmp_path: Path) -> None:
    a = old_run(tmp_path / "run-a", 0.8123, "vit_tiny_patch16")
    b = old_run(tmp_path / "run-b", 0.4567, "resnet18")
    out = tmp_path / "cmp" / "comparison.html"
    assert main(["report", str(a), str(b), "--out", str(out), "--title", "two runs"]) == 0
    page = out.read_text()
    summary = page.split("<h2>summary</h2>")[1].split("</table>")[0]
    assert "run-a" in summary and "run-b" in summary and "0.8123" in summary and "0.4567" in summary
    assert "resnet18" in summary and "<title>two runs</title>" in page
    assert len(_images(page)) == 6
    assert not (out.parent / "artefacts.json").exists()  # a page outside the runs leaves no manifest behind


def test_report_errors(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "artefacts.json").write_text("{not json")
    for args, expected in [([str(empty)], "nothing to report"), ([str(tmp_path / "nope")], "does not exist"),
                           ([str(empty), "--out", str(tmp_path / "r.txt")], "expected an .html file"),
                           ([str(broken)], "not a leukolab artefact manifest")]:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1


def test_an_unreadable_table_costs_a_line_not_the_page(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "t.csv").write_bytes(b"")
    record(run, "t.csv", "table", "empty table")
    (run / "history.csv").write_text(HISTORY)
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "(could not read t.csv: EmptyDataError" in page and "best val_balanced_accuracy" in page


def test_an_experiment_figure_comes_before_its_cells_figures(tmp_path: Path) -> None:
    from PIL import Image

    exp = tmp_path / "exp"
    for i in range(5):
        (exp / "runs" / f"cell{i}").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(exp / "runs" / f"cell{i}" / "curves.png")
        (exp / "runs" / f"cell{i}" / "history.csv").write_text(HISTORY)
    Image.new("RGB", (4, 4)).save(exp / "label_efficiency.png")
    art = collect_run(exp, max_images=2)
    assert [p.path.relative_to(exp).as_posix() for p in art.images] == ["label_efficiency.png", "runs/cell0/curves.png"]
    out = tmp_path / "r.html"
    assert main(["report", str(exp), "--out", str(out), "--max-images", "2"]) == 0
    assert "4 more figures not shown (--max-images 2)" in out.read_text()
