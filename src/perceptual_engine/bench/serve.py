"""Load benchmark of ``perceptual-engine serve``: p50, p99 and throughput at several
concurrencies on loopback, batching on and off, against a plain FastAPI + uvicorn app that
runs one Engine.distance per request, and the direct Engine.distance + decode latency.

    python -m perceptual_engine.bench.serve [--model M.onnx] [--concurrency 1,8,16,32]

Without --model, an LPIPS model with seeded random VGG16 weights (and the installed lpips
package's linear heads) is exported to a temporary folder. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Row:
    server: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    throughput: float  # requests per second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving ") or proc.poll() is not None:
            break
    if proc.poll() is not None:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(url: str, a: str, b: str, concurrency: int, requests: int, name: str) -> Row:
    """``requests`` requests per client thread, ``concurrency`` threads, after a warm-up."""
    from ..serve.client import Client

    client = Client(url, timeout=120, retries=0)
    deadline = time.monotonic() + 60  # the baseline says "serving" just before uvicorn binds
    while True:
        try:
            client.distance(a, b)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for _ in range(3):
        client.distance(a, b)
    lat: list[float] = []

    def work():
        for _ in range(requests):
            t0 = time.perf_counter()
            client.distance(a, b)
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return Row(name, concurrency, len(lat), 1000 * statistics.median(lat),
               1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], len(lat) / wall)


def direct_p50(model: str, a: str, b: str, repeat: int = 50) -> float:
    """ms: read both files, decode them (load_image) and one Engine.distance, median of ``repeat``."""
    from ..images import decode_bytes
    from ..runtime import Engine

    engine = Engine(model, device="cpu")
    times = []
    for i in range(repeat + 3):
        t0 = time.perf_counter()
        with open(a, "rb") as fa, open(b, "rb") as fb:
            x, y = decode_bytes(fa.read(), "a")[None], decode_bytes(fb.read(), "b")[None]
        engine.distance(x, y)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def baseline_app(model: str, port: int) -> None:
    """A plain FastAPI + uvicorn app: one decode and one Engine.distance per request."""
    import uvicorn
    from fastapi import FastAPI, File

    from ..images import decode_bytes
    from ..runtime import Engine

    engine = Engine(model, device="cpu")
    app = FastAPI()

    @app.post("/v1/distance")
    def distance(a: bytes = File(), b: bytes = File()) -> dict:  # sync: run in the thread pool
        out = engine.distance(decode_bytes(a, "a")[None], decode_bytes(b, "b")[None])
        return {"total": float(out["total"][0])}

    print(f"serving http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def run(model: str, a: str, b: str, concurrency: list[int], requests: int) -> tuple[list[Row], float]:
    rows = []
    py = [sys.executable, "-m"]
    configs = [("Ray Serve, batching on (--max-batch 16)", ["--max-batch", "16"]),
               ("Ray Serve, batching off (--max-batch 1)", ["--max-batch", "1"]),
               ("FastAPI + uvicorn, one Engine.distance per request", None)]
    for name, flags in configs:
        port = _free_port()
        if flags is None:
            proc = _start(py + ["perceptual_engine.bench.serve", "--baseline-app", model, str(port)])
        else:
            proc = _start(py + ["perceptual_engine.cli", "serve", "--model", model, "--port", str(port),
                                "--device", "cpu", *flags])
        try:
            for c in concurrency:
                rows.append(load(f"http://127.0.0.1:{port}", a, b, c, max(8, requests // c), name))
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            _stop(proc)
    return rows, direct_p50(model, a, b)


def markdown(rows: list[Row], direct: float) -> str:
    lines = ["| server | concurrency | requests | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.server} | {r.concurrency} | {r.requests} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
              f"{r.throughput:.1f} |" for r in rows]
    lines.append(f"\nDirect: read + decode + Engine.distance, one pair, p50 {direct:.1f} ms.")
    return "\n".join(lines)


def _images(folder: str, size: int) -> tuple[str, str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perceptual_engine.bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an exported distance, lpips or dists model (default: LPIPS, random VGG16)")
    p.add_argument("--concurrency", default="1,8,16,32", help="client threads, comma-separated")
    p.add_argument("--requests", type=int, default=256, help="requests per level (at least 8 per thread)")
    p.add_argument("--size", type=int, default=64, help="square image side (default: 64)")
    p.add_argument("--baseline-app", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_app:
        baseline_app(args.baseline_app[0], int(args.baseline_app[1]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from .. import lpips as L
            from ..export import export_onnx

            model = os.path.join(tmp, "lpips.onnx")
            export_onnx(L.default_spec("random"), model, graph="lpips")
        a, b = _images(tmp, args.size)
        rows, direct = run(model, a, b, [int(c) for c in args.concurrency.split(",")], args.requests)
    print(markdown(rows, direct))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
