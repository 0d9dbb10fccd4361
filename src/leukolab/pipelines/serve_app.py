"""The web app of ``leukolab serve`` (FastAPI + uvicorn): the page, the JSON API and its OpenAPI description.

Routes: ``GET /`` (the page, from ``leukolab/static/serve``: no CDN, no external fonts), ``GET /api/health``,
``GET /api/runs``, ``POST /api/analyse`` (multipart: ``files`` + options; answers when done),
``POST /api/jobs`` + ``GET /api/jobs/{id}`` (the same analysis in the background, with per-file progress: what
the page uses), ``GET /api/results/{id}.zip``; ``/docs`` and ``/openapi.json`` are FastAPI's. Errors are JSON
``{"detail": "one line"}`` with a 4xx status. All the work is in :mod:`leukolab.pipelines.serve_analysis`.
"""

from __future__ import annotations

import json
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from leukolab.pipelines.serve import require_serve_dependencies

require_serve_dependencies()  # one line naming what to pip install, before the imports below fail

from fastapi import FastAPI, File, Form, Request, UploadFile  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402

import leukolab  # noqa: E402
from leukolab.errors import LeukolabError  # noqa: E402
from leukolab.pipelines.serve import ServeOptions, UploadError, store_uploads  # noqa: E402
from leukolab.pipelines.serve_analysis import Choice, Service  # noqa: E402

__all__ = ["create_app", "serve"]

def static_dir() -> Path:
    """The folder of the page's HTML, JS and CSS (package data)."""
    return Path(str(resources.files("leukolab") / "static" / "serve"))


class BodyLimit:
    """ASGI middleware: requests whose body exceeds ``max_bytes`` get 413 (by Content-Length up front, or while
    a chunked body streams in), before any upload is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over {self.max_bytes / 1e6:g} MB; send fewer or smaller files"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, {"detail": message})
            return
        seen, over = 0, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, over
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                over = True
                return {"type": "http.disconnect"}
            return msg

        started = False

        async def guarded_send(msg: dict[str, Any]) -> None:
            nonlocal started
            if over:  # replace whatever the app answered to the cut-off body
                if not started:
                    started = True
                    await _send_json(send, 413, {"detail": message})
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over a :class:`~leukolab.pipelines.serve_analysis.Service`."""
    limits = service.options.limits
    app = FastAPI(title="leukolab serve", version=getattr(leukolab, "__version__", "0"),
                  description="Smear fields or single-cell crops in; cells, types and the differential count out. "
                              "Computed by the functions of `leukolab smear analyse`.")
    app.add_middleware(BodyLimit, max_bytes=int(limits.max_request_mb * 1e6))

    @app.exception_handler(LeukolabError)
    async def _user_error(_request: Request, exc: LeukolabError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=int(getattr(exc, "status", 400)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(v) for v in e.get('loc', ()) if v != 'body')}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    def read(files: list[UploadFile]) -> list[tuple[str | None, bytes]]:
        cap = int(limits.max_file_mb * 1e6)
        out = []
        for f in files:
            data = f.file.read(cap + 1)
            if len(data) > cap:
                raise UploadError(f"{f.filename}: over {limits.max_file_mb:g} MB; expected at most "
                                  f"{limits.max_file_mb:g} MB per file", 413)
            out.append((f.filename, data))
        return out

    def choice(detector: str | None, classifier: list[str], mode: str, score: float, tta: bool, attention: bool,
               keep: bool, images: bool) -> Choice:
        return Choice(detector or None, [c for c in classifier if c], mode, score, tta, attention, keep, images)

    @app.get("/api/health", summary="Is the server up; how many models are loaded")
    def health() -> dict[str, Any]:
        return {"status": "ok", "runs": len(service.runs), "models_loaded": service.models.loads,
                "device": str(service.device),
                "jobs_running": sum(j.finished is None for j in list(service.jobs.values()))}

    @app.get("/api/runs", summary="Detector runs, classifier runs and ensembles found under the runs folder")
    def runs() -> dict[str, Any]:
        return service.runs_json()

    @app.post("/api/analyse", summary="Analyse smear fields (or single-cell crops); answers when done")
    def analyse(
        files: list[UploadFile] = File(default=[], description="PNG, JPEG, TIFF or BMP images"),
        detector: str | None = Form(None, description="detector run id (default: the server's)"),
        classifier: list[str] = Form(default=[], description="classifier / ensemble run ids, averaged"),
        mode: str = Form("fields", description="fields: detect cells in smear fields; cells: each image is a cell"),
        score: float = Form(0.3, description="detector score threshold"),
        tta: bool = Form(False, description="dihedral test-time augmentation"),
        attention: bool = Form(False, description="attention maps of a ViT classifier"),
        keep: bool = Form(False, description="keep the request folder (uploads + results) on the server"),
        images: bool = Form(True, description="embed annotated fields and thumbnails (data URLs)"),
    ) -> dict[str, Any]:
        ch = choice(detector, classifier, mode, score, tta, attention, keep, images)
        service.resolve(ch)
        batch = store_uploads(read(files), limits, service.work_dir, keep)
        return service.analyse(batch, ch)

    @app.post("/api/jobs", status_code=202, summary="Start the same analysis in the background (poll /api/jobs/ID)")
    def submit(
        files: list[UploadFile] = File(default=[]), detector: str | None = Form(None),
        classifier: list[str] = Form(default=[]), mode: str = Form("fields"), score: float = Form(0.3),
        tta: bool = Form(False), attention: bool = Form(False), keep: bool = Form(False), images: bool = Form(True),
    ) -> dict[str, Any]:
        ch = choice(detector, classifier, mode, score, tta, attention, keep, images)
        service.resolve(ch)
        return service.submit(store_uploads(read(files), limits, service.work_dir, keep), ch).to_json()

    @app.get("/api/jobs/{job_id}", summary="Progress of a background analysis, and its result when done")
    def job(job_id: str) -> dict[str, Any]:
        return service.job(job_id).to_json()

    @app.get("/api/results/{result_id}.zip", summary="cells.csv, differential.csv/.png, annotated/ of a result",
             response_class=Response)
    def result_zip(result_id: str) -> Response:
        data = service.results.get(result_id)
        if data is None:
            raise UploadError(f"result {result_id!r}: unknown or expired (only the latest results are kept)", 404)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="leukolab-results.zip"'})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(static_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LeukolabError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); expected a free "
                                "port on a local address") from None


def serve(options: ServeOptions, announce: Any = print) -> None:
    """Start the server of :class:`~leukolab.pipelines.serve.ServeOptions` and block until Ctrl-C."""
    import uvicorn

    if not 0 <= options.port <= 65535:
        raise LeukolabError(f"--port {options.port}: expected 0..65535")
    _check_port(options.host, options.port)
    service = Service(options)
    app = create_app(service)
    kinds = {k: sum(r.kind == k for r in service.runs) for k in ("detector", "classifier", "ensemble")}
    host = f"[{options.host}]" if ":" in options.host else options.host
    announce(f"leukolab serve: http://{host}:{options.port}/  (API docs: /docs; {kinds['detector']} detector(s), "
             f"{kinds['classifier']} classifier(s), {kinds['ensemble']} ensemble(s) under {service.runs_root}; "
             "Ctrl-C stops)")
    if options.host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"warning: listening on {options.host}: other machines can reach this server and upload images")
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    finally:
        service.close()
