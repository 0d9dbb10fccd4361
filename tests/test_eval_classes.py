"""``evaluate --data`` on another lab's folders: class names in another case, and only some of the classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukolab.cli.main import main
from leukolab.data.readers import LabelledImages
from leukolab.errors import LeukolabError
from leukolab.pipelines.classify import evaluate_run


def _copy_classes(src: Path, dst: Path, names: dict[str, str], n: int = 6) -> Path:
    """``dst/<new name>/`` holding the first ``n`` images of ``src/<old name>/`` for each ``old -> new``."""
    for old, new in names.items():
        (dst / new).mkdir(parents=True)
        for p in sorted((src / old).glob("*.png"))[:n]:
            shutil.copy(p, dst / new / p.name)
    return dst


def test_targets_match_case_variants_and_refuse_unknown_or_ambiguous_classes() -> None:
    data = LabelledImages([Path("a"), Path("b"), Path("c")], ["EOSINOPHIL", "Basophil", "eosinophil"])
    assert data.targets(["basophil", "eosinophil", "lymphocyte"]) == [1, 0, 1]
    with pytest.raises(LeukolabError, match=r"class 'platelet' is not one the model knows; expected one of: "
                                            r"basophil, eosinophil"):
        LabelledImages([Path("a")], ["platelet"]).targets(["basophil", "eosinophil"])
    with pytest.raises(LeukolabError, match="'EOS'"):  # two model classes differ only in case: no guessing
        LabelledImages([Path("a")], ["EOS"]).targets(["eos", "Eos"])
    assert LabelledImages([Path("a")], ["Eos"]).targets(["eos", "Eos"]) == [1]  # an exact match wins


def test_evaluate_upper_case_subset_scores_only_the_classes_present(
        tiny_run: Path, wbc_small: Path, tmp_path: Path) -> None:
    lower = _copy_classes(wbc_small, tmp_path / "lower", {"eosinophil": "eosinophil", "lymphocyte": "lymphocyte"})
    upper = _copy_classes(wbc_small, tmp_path / "upper", {"eosinophil": "EOSINOPHIL", "lymphocyte": "Lymphocyte"})
    out_lower = evaluate_run(tiny_run, lower, tmp_path / "eval-lower", show_progress=False)
    assert main(["evaluate", str(tiny_run), "--data", str(upper), "--out", str(tmp_path / "eval-upper"),
                 "--no-progress"]) == 0
    m_lower = json.loads((out_lower / "metrics.json").read_text())
    m_upper = json.loads((tmp_path / "eval-upper" / "metrics.json").read_text())
    for key in ("n", "accuracy", "balanced_accuracy", "f1_macro", "confusion_matrix"):
        assert m_upper[key] == m_lower[key], key
    # metrics over the 2 classes present; the confusion matrix keeps the model's 5 classes
    assert m_upper["n"] == 12 and m_upper["n_classes_present"] == 2
    assert np.asarray(m_upper["confusion_matrix"]).shape == (5, 5)
    table = pd.read_csv(tmp_path / "eval-upper" / "predictions.csv")
    assert set(table["actual"]) == {"eosinophil", "lymphocyte"}  # the model's names
    recalls = [(table[table["actual"] == c]["predicted"] == c).mean() for c in ("eosinophil", "lymphocyte")]
    assert m_upper["balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_evaluate_refuses_a_class_the_model_does_not_know(
        tiny_run: Path, wbc_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _copy_classes(wbc_small, tmp_path / "d", {"eosinophil": "EOSINOPHIL", "monocyte": "platelet"}, n=2)
    before = sorted(tiny_run.iterdir())
    assert main(["evaluate", str(tiny_run), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: class 'platelet' is not one the model knows; expected one of: "
                   "basophil, eosinophil, lymphocyte, monocyte, neutrophil")
    assert sorted(tiny_run.iterdir()) == before  # nothing written
