"""``leukolab serve``'s JSON API (FastAPI's TestClient): runs, analyses equal to ``smear analyse``, bad uploads."""

from __future__ import annotations

import io
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="leukolab serve needs the serve extra: pip install 'leukolab[serve]'")
pytest.importorskip("python_multipart", reason="leukolab serve needs python-multipart")

from fastapi.testclient import TestClient

from leukolab.cli.main import main
from leukolab.pipelines.serve import ServeLimits, ServeOptions, safe_name
from leukolab.pipelines.serve_analysis import Service
from leukolab.pipelines.serve_app import create_app
from leukolab.pipelines.smear import SmearOptions, analyse_smears
from serve_helpers import TinyRuns, snapshot, tiny_runs

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
SCORE = 0.005  # the 1-epoch detector scores ~0.01


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    return tiny_runs(tmp_path_factory.mktemp("serve"))


def _client(runs: TinyRuns, work: Path, **limits: float) -> tuple[TestClient, Service]:
    service = Service(ServeOptions(runs.root, work_dir=work, limits=ServeLimits(**limits)))
    return TestClient(create_app(service)), service


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_runs_list_the_runs_with_their_metrics(runs: TinyRuns, tmp_path: Path) -> None:
    client, _ = _client(runs, tmp_path)
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["runs"] == 3 and health["models_loaded"] == 0
    data = client.get("/api/runs").json()
    kinds = {r["id"]: r["kind"] for r in data["runs"]}
    det_id, cls_id = f"det/{runs.detector.name}", f"cls/{runs.classifier.name}"
    assert kinds == {det_id: "detector", cls_id: "classifier", "ens": "ensemble"}
    by_id = {r["id"]: r for r in data["runs"]}
    history = pd.read_csv(runs.detector / "history.csv")
    assert by_id[det_id]["metrics"]["val_map50"] == pytest.approx(history["val_map50"].max(), abs=1e-4)
    assert 0.0 <= by_id[cls_id]["metrics"]["val_balanced_accuracy"] <= 1.0
    assert by_id[cls_id]["classes"] == CLASSES == by_id["ens"]["classes"]
    assert data["default_detector"] == det_id and data["default_classifiers"] == [cls_id]
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/analyse", "/api/runs", "/api/health"}
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "http" not in client.get("/static/app.js").text.replace("XMLHttpRequest", "")  # no CDN, no remote calls


def test_analyse_equals_smear_analyse_and_writes_nothing_under_runs(runs: TinyRuns, tmp_path: Path) -> None:
    before = snapshot(runs.root)
    work = tmp_path / "work"
    work.mkdir()
    client, service = _client(runs, work)
    images = runs.fields[:3]
    res = client.post("/api/analyse", files=_files(images), data={"score": str(SCORE)})
    assert res.status_code == 200, res.text
    body = res.json()

    out = analyse_smears(images, runs.detector, [runs.classifier], tmp_path / "cli",
                         SmearOptions(score=SCORE, progress=False))
    cli_table = pd.read_csv(out / "differential.csv")
    api_table = pd.DataFrame(body["differential"])
    assert list(api_table["image"]) == [p.name for p in images] + ["TOTAL"]
    assert int(api_table["cells"].iloc[-1]) > 0  # the comparison is about real cells
    pd.testing.assert_frame_equal(api_table.drop(columns="image"), cli_table.drop(columns="image"), check_dtype=False)
    assert sum(len(f["cells"]) for f in body["fields"]) == int(cli_table["cells"].iloc[-1] +
                                                               cli_table["background"].iloc[-1])
    first = body["fields"][0]
    assert first["annotated"].startswith("data:image/png;base64,") and first["cells"][0]["thumbnail"]
    assert first["differential"]["image"] == images[0].name

    archive = zipfile.ZipFile(io.BytesIO(client.get(body["zip"]).content))
    assert {"cells.csv", "differential.csv", "differential.png", "summary.json"} <= set(archive.namelist())
    assert sorted(n for n in archive.namelist() if n.startswith("annotated/")) == [
        f"annotated/{p.stem}.png" for p in images]
    zipped_cells = pd.read_csv(archive.open("cells.csv"))
    pd.testing.assert_frame_equal(zipped_cells.drop(columns="image"),
                                  pd.read_csv(out / "cells.csv").drop(columns="image"))

    # a second request reuses the loaded models; the request folders are gone; nothing under --runs changed
    assert client.post("/api/analyse", files=_files(images[:1]), data={"score": str(SCORE)}).status_code == 200
    assert service.models.loads == 2  # one detector + one classifier
    assert list(work.iterdir()) == []
    assert snapshot(runs.root) == before


def test_single_cell_crops_and_the_ensemble(runs: TinyRuns, tmp_path: Path) -> None:
    from leukolab.pipelines.predictors import load_predictor

    client, _ = _client(runs, tmp_path)
    crops = [Image.fromarray(np.asarray(Image.open(runs.fields[0]))[10:60, 20:70]), Image.open(runs.fields[1])]
    res = client.post("/api/analyse", data={"mode": "cells", "classifier": "ens"},
                      files=[("files", (f"c{i}.png", _png(c), "image/png")) for i, c in enumerate(crops)])
    assert res.status_code == 200, res.text
    body = res.json()
    expected = load_predictor(runs.classifier).predict_images([c.convert("RGB") for c in crops])
    for field, probs in zip(body["fields"], expected, strict=True):
        assert len(field["cells"]) == 1 and field["cells"][0]["detector_score"] is None
        np.testing.assert_allclose(field["cells"][0]["probs"], probs, atol=2e-4)
        assert field["cells"][0]["type"] == CLASSES[int(np.argmax(probs))]
    assert body["total"]["cells"] == 2 and body["detector"] is None and body["classifiers"] == ["ens"]


def test_jobs_report_progress_and_concurrent_requests_load_models_once(runs: TinyRuns, tmp_path: Path) -> None:
    client, _ = _client(runs, tmp_path)
    start = client.post("/api/jobs", files=_files(runs.fields[:2]), data={"score": str(SCORE), "images": "false"})
    assert start.status_code == 202 and start.json()["total"] == 2
    job = start.json()
    for _ in range(600):
        job = client.get(f"/api/jobs/{job['job']}").json()
        if job["state"] in ("done", "error"):
            break
        threading.Event().wait(0.05)
    assert job["state"] == "done" and job["done"] == 2, job
    assert "annotated" not in job["result"]["fields"][0]
    assert client.get("/api/jobs/nope").status_code == 404

    fresh, fresh_service = _client(runs, tmp_path)
    codes: list[int] = []

    def post() -> None:
        codes.append(fresh.post("/api/analyse", files=_files(runs.fields[2:3]), data={"score": str(SCORE)}).status_code)

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200, 200, 200] and fresh_service.models.loads == 2


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # 400 Mpx in ~50 kB: PIL refuses to open it
    return buf.getvalue()


def test_bad_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(runs: TinyRuns, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    client, _ = _client(runs, work, max_file_mb=0.5, max_pixels=200_000, max_files=3, max_request_mb=1.0)
    good = runs.fields[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    png = _png(Image.new("RGB", (64, 64), (200, 100, 50)))
    cases = [
        ({"files": [("files", ("notes.png", b"just text", "image/png"))]}, 415, "not an image"),
        ({"files": [("files", ("empty.jpg", b"", "image/jpeg"))]}, 422, "empty"),
        ({"files": [("files", ("cut.png", png[: len(png) // 2], "image/png"))]}, 422, "corrupt or truncated"),
        ({"files": [("files", ("a.gif", gif.getvalue(), "image/gif"))]}, 415, "GIF"),
        ({"files": [("files", ("big.png", _png(Image.new("L", (500, 500))), "image/png"))]}, 413, "Mpx"),
        ({"files": [("files", ("bomb.png", _bomb(), "image/png"))]}, 413, "too many pixels"),
        ({"files": [("files", ("huge.bmp", b"BM" + bytes(600_000), "image/bmp"))]}, 413, "MB"),
        ({"files": _files(runs.fields[:4])}, 413, "at most 3"),
        ({"data": {"score": "0.1"}}, 422, "no file uploaded"),
        ({"files": _files(runs.fields[:1]), "data": {"detector": "nowhere"}}, 404, "not a run"),
        ({"files": _files(runs.fields[:1]), "data": {"detector": "ens"}}, 422, "expected a detector"),
        ({"files": _files(runs.fields[:1]), "data": {"mode": "tiles"}}, 422, "mode"),
        ({"files": _files(runs.fields[:1]), "data": {"score": "2"}}, 422, "score"),
        ({"files": _files(runs.fields[:1]), "data": {"score": "high"}}, 422, "score"),
    ]
    for kwargs, status, needle in cases:
        res = client.post("/api/analyse", **kwargs)
        assert res.status_code == status, (needle, res.status_code, res.text)
        assert needle in res.json()["detail"], (needle, res.json())
        assert client.get("/api/health").json()["status"] == "ok"
    too_big = client.post("/api/analyse", content=b"x" * 1_100_000, headers={"content-type": "multipart/form-data"})
    assert too_big.status_code == 413 and "MB" in too_big.json()["detail"]
    assert list(work.iterdir()) == []  # refused uploads never reached the disk

    kept = client.post("/api/analyse", files=[("files", ("../../etc/x y.jpg", good, "image/jpeg"))],
                       data={"keep": "true", "score": str(SCORE)})
    assert kept.status_code == 200, kept.text
    folder = Path(kept.json()["kept"])
    assert folder.parent == work and (folder / "uploads" / "0000.jpg").read_bytes() == good
    assert kept.json()["fields"][0]["name"] == "x_y.jpg" == safe_name("../../etc/x y.jpg", 0)
    assert (folder / "results" / "differential.csv").is_file()


def test_cli_serve_errors_are_one_line(runs: TinyRuns, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--runs", str(runs.root), "--port", str(port)]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert main(["serve", "--runs", str(runs.root / "missing"), "--port", "0"]) == 2
    assert "not a folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert main(["serve", "--runs", str(runs.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'leukolab[serve]'" in err


def test_attention_overlay_only_for_a_vit_backbone() -> None:
    import types

    import timm
    import torch

    from leukolab.pipelines.serve_analysis import _attention

    crops = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)) for i in range(3)]

    def predictor(backbone: torch.nn.Module) -> types.SimpleNamespace:
        return types.SimpleNamespace(model=types.SimpleNamespace(backbone=backbone), device=torch.device("cpu"),
                                     tensors=lambda ims: torch.randn(len(ims), 3, 32, 32))

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0, pretrained=False)
    maps = _attention(predictor(vit), crops)
    assert maps is not None and len(maps) == 3
    overlay = Image.open(io.BytesIO(__import__("base64").b64decode(maps[0].split(",", 1)[1])))
    assert overlay.size == (160, 160)
    assert _attention(predictor(torch.nn.Conv2d(3, 4, 3)), crops) is None  # a CNN: no attention map
