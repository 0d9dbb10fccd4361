"""Hand-crafted cell morphology (``--encoder morphology``): the numbers follow the cells drawn, and the MIL task
trains, evaluates and refuses fine-tuning with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukolab.cli.main import main
from leukolab.data.mil import read_cohort
from leukolab.data.morphology import FEATURE_NAMES, cell_morphology
from leukolab.data.synthetic.patients import PatientOptions, make_patients, render_lymphocyte
from leukolab.pipelines.mil import train_mil
from leukolab.pipelines.mil_encoder import embed_cohort, load_encoder

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _drawn_cell(notch: bool = False, cell_r: float = 30, nucleus_r: float = 18, size: int = 96) -> np.ndarray:
    """A pale field with a lilac cytoplasm disk and a dark purple nucleus (optionally with a deep wedge cut out)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64) - size / 2
    r, angle = np.hypot(xx, yy), np.arctan2(yy, xx)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = (236, 226, 214)
    img[r <= cell_r] = (196, 176, 222)
    nucleus = r <= nucleus_r
    if notch:
        nucleus &= ~((np.abs(angle) < 0.5) & (r > 4))  # a cleft from the rim to near the centre
    img[nucleus] = (92, 42, 140)
    return img


def test_features_follow_the_drawn_cell() -> None:
    round_cell = cell_morphology(_drawn_cell())
    assert round_cell[F["found"]] == 1
    assert round_cell[F["nc_ratio"]] == pytest.approx((18 / 30) ** 2, abs=0.06)
    assert round_cell[F["cell_area"]] == pytest.approx(np.pi * 30**2 / 96**2, rel=0.1)
    assert round_cell[F["nucleus_solidity"]] > 0.95
    assert round_cell[F["nucleus_od"]] > round_cell[F["cytoplasm_od"]]
    cleaved = cell_morphology(_drawn_cell(notch=True))
    assert cleaved[F["nucleus_solidity"]] < round_cell[F["nucleus_solidity"]] - 0.08
    assert cleaved[F["nucleus_circularity"]] < round_cell[F["nucleus_circularity"]]
    big = cell_morphology(_drawn_cell(cell_r=40, nucleus_r=24))
    assert big[F["cell_area"]] > 1.5 * round_cell[F["cell_area"]]


def test_nothing_stained_is_all_zeros() -> None:
    assert not cell_morphology(np.full((64, 64, 3), 230, dtype=np.uint8)).any()
    assert not cell_morphology(np.zeros((2, 2, 3), dtype=np.uint8)).any()
    assert not cell_morphology(np.zeros((8, 8), dtype=np.uint8)).any()


def test_synthetic_lymphocyte_kinds_differ_as_drawn() -> None:
    rng = np.random.default_rng(0)

    def mean(kind: str) -> np.ndarray:
        return np.stack([cell_morphology(render_lymphocyte(kind, 96, rng)) for _ in range(12)]).mean(0)

    typical, large, reactive, smudge = mean("typical"), mean("large"), mean("reactive"), mean("smudge")
    assert large[F["cell_area"]] > 1.8 * typical[F["cell_area"]]
    assert reactive[F["cell_area"]] > 1.8 * typical[F["cell_area"]]
    assert reactive[F["nc_ratio"]] < typical[F["nc_ratio"]] - 0.15  # abundant cytoplasm
    assert smudge[F["nucleus_od"]] < 0.5 * typical[F["nucleus_od"]]  # pale smeared chromatin


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = PatientOptions(n_patients=10, cells_min=3, cells_max=5, size=64, seed=2, tumoral_fraction=0.5)
    return make_patients(tmp_path_factory.mktemp("morph") / "bags", options, progress=False)


def test_morphology_encoder_embeds_a_cohort(bags: Path, tmp_path: Path) -> None:
    cohort = read_cohort(bags)
    encoder = load_encoder("morphology")
    assert encoder.dim == len(FEATURE_NAMES) and encoder.kind == "morphology"
    feats = embed_cohort(cohort, encoder, tmp_path / "cache", batch_size=3, progress=False)
    assert [len(f) for f in feats] == [len(p.cells) for p in cohort.patients]
    first = np.asarray(Image.open(cohort.patients[0].cells[0]).convert("RGB").resize((224, 224), Image.BILINEAR))
    assert torch.allclose(feats[0][0], torch.from_numpy(cell_morphology(first)), rtol=0.05, atol=0.02)
    assert float(torch.cat(feats)[:, F["found"]].mean()) > 0.9


def test_mil_trains_and_evaluates_on_morphology(bags: Path, tmp_path: Path) -> None:
    run = train_mil(tmp_path / "runs", overrides={
        "data.bags": str(bags), "encoder.model": "morphology", "train.epochs": 2, "train.progress": False,
        "data.batch_size": 4, "data.passes_per_epoch": 1, "model.hidden": 16})
    assert (run / "best.pt").is_file()
    assert main(["mil", "evaluate", str(run), "--data", str(bags), "--no-progress", "--gallery", "1"]) == 0
    (metrics_file,) = run.glob("eval-*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["patients"] == 10 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert json.loads((run / "val_metrics.json").read_text())["patients"] >= 2


def test_finetuning_morphology_is_one_line_exit_2(bags: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["mil", "train", str(bags), "--encoder", "morphology", "--finetune-encoder", "--out",
                 str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "morphology has no weights to fine-tune" in err and len(err.splitlines()) == 1
