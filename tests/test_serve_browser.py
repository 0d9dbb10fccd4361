"""``leukolab serve``'s page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Nothing downloads a browser: Playwright launches the system binary (``executable_path``); without one the test
skips and says why (``.ci/run`` installs ``chromium`` with apt-get).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="leukolab serve needs the serve extra: pip install 'leukolab[serve]'")
pytest.importorskip("uvicorn", reason="leukolab serve needs uvicorn")
pytest.importorskip("playwright", reason="the browser test needs playwright (the test extra)")

import uvicorn

from leukolab.pipelines.serve import ServeOptions
from leukolab.pipelines.serve_analysis import Service
from leukolab.pipelines.serve_app import create_app
from serve_helpers import TinyRuns, tiny_runs

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    env = os.environ.get("LEUKOLAB_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (apt-get install chromium, or set "
                                "LEUKOLAB_CHROMIUM); Playwright is never allowed to download one")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TinyRuns]]:
    """A real uvicorn on 127.0.0.1 (a free port) in a thread, over the tiny runs."""
    runs = tiny_runs(tmp_path_factory.mktemp("serve"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = Service(ServeOptions(runs.root))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", runs
    server.should_exit = True
    thread.join(10)
    service.close()


def test_page_shows_boxes_and_the_differential(server: tuple[str, TinyRuns], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, runs = server
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base + "/")
            page.wait_for_selector("#detector option", state="attached")
            assert page.locator("input[name=classifier]:checked").count() == 1

            page.set_input_files("#files", str(bad))  # a corrupt upload: a message, no result
            page.click("#analyse")
            page.wait_for_selector("#error:not([hidden])")
            assert "broken.png" in page.inner_text("#error") and page.locator("#results").is_hidden()

            page.fill("#score", "0.005")  # the 1-epoch detector scores ~0.01
            page.set_input_files("#files", [str(p) for p in runs.fields[:2]])
            page.click("#analyse")
            page.wait_for_selector("#differential tr.total", timeout=60_000)
            assert page.locator("#error").is_hidden()
            total = page.locator("#differential tr.total td")
            cells = int(total.nth(1).inner_text()) + int(total.nth(2).inner_text())  # typed + background
            assert cells > 0
            assert page.locator(".field").count() == 2 and page.locator("img.annotated").count() == 2
            assert page.locator(".box").count() == cells == page.locator("table.cells tbody tr").count()
            assert page.locator("#overall-chart .bar").count() == 5
            assert page.get_attribute("#download", "href").startswith("/api/results/")

            page.locator(".box").first.dispatch_event("click")  # boxes may overlap: no pointer hit-test
            page.wait_for_selector("#cell-detail:not([hidden])")
            assert page.locator("#cell-probs .bar").count() == 5
            assert "cell 1" in page.inner_text("#cell-title")
            shot = Path(os.environ.get("LEUKOLAB_SCREENSHOT_DIR", tmp_path)) / "page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert requests and all(u.startswith(base) or u.startswith("data:") for u in requests), requests
