"""Load check of ``leukolab serve``: N concurrent clients POST a smear field to a real uvicorn on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py --clients 4 --seconds 20
    .venv/bin/python benchmarks/serve_load.py --runs RUNS --clients 8 --seconds 60 --image field.jpg

Without ``--runs`` it trains the tiny 1-epoch detector and classifier of the tests (~10 s) in a temporary
folder. The server is ``leukolab serve`` in its own process (``OMP_NUM_THREADS`` = ``--server-threads``);
each client is a thread with its own HTTP connection sending ``/api/analyse`` requests back to back for
``--seconds``. Prints requests/s, p50/p95/max latency and the error count (non-200 answers and failures).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def _multipart(path: Path, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _wait(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"leukolab serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("leukolab serve did not answer /api/health")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, help="runs folder (default: train tiny runs in a temporary folder)")
    ap.add_argument("--image", type=Path, help="field to upload (default: a synthetic 128 x 96 field)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--score", type=float, default=0.005, help="detector score threshold sent with each request")
    ap.add_argument("--server-threads", type=int, default=1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    if args.runs is None or args.image is None:
        import torch

        from serve_helpers import tiny_runs

        torch.set_num_threads(1)
        runs = tiny_runs(tmp)
        args.runs = args.runs or runs.root
        args.image = args.image or runs.fields[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    proc = subprocess.Popen([sys.executable, "-m", "leukolab.cli.main", "serve", "--runs", str(args.runs),
                             "--port", str(port), "--work-dir", str(tmp)], env=env)
    try:
        _wait(port, proc)
        body, ctype = _multipart(args.image, {"score": str(args.score), "images": "false"})
        # one warm-up request loads the models
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/api/analyse", body, {"Content-Type": ctype})
        warm = conn.getresponse()
        cells = json.loads(warm.read())["total"]["cells"] if warm.status == 200 else None
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + args.seconds

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/api/analyse", body, {"Content-Type": ctype})
                    res = conn.getresponse()
                    res.read()
                    ok = res.status == 200
                except OSError as exc:
                    ok, conn = False, http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    res = exc  # type: ignore[assignment]
                with lock:
                    (latencies.append(time.perf_counter() - t0) if ok else errors.append(str(res)))

        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    lat = np.array(latencies) * 1000
    done = len(latencies)
    print(f"leukolab serve load: {args.clients} clients x {args.seconds:g} s, field {args.image.name} "
          f"({cells} cells at score {args.score}), server torch threads {args.server_threads}")
    print(f"requests ok {done}, errors {len(errors)}, {done / wall:.2f} requests/s; latency ms p50 "
          f"{np.percentile(lat, 50):.0f}, p95 {np.percentile(lat, 95):.0f}, max {lat.max():.0f}" if done else
          f"no request succeeded; errors {len(errors)}: {errors[:3]}")
    left = [p for p in tmp.glob("leukolab-serve-*")]
    print(f"request folders left behind: {len(left)}")


if __name__ == "__main__":
    main()
