"""Load benchmark of ``perceptual-engine serve``: p50, p99 and throughput at several
concurrencies on loopback, batching on and off, against a plain FastAPI + uvicorn app that
runs one Engine.distance per request, and the direct Engine.distance + decode latency.

    python -m perceptual_engine.bench.serve [--model M.onnx] [--concurrency 1,8,16,32]

Without --model, an LPIPS model with seeded random VGG16 weights (and the installed lpips
package's linear heads) is exported to a temporary folder, in a process of its own. The
load generator keeps one HTTP/1.1 keep-alive connection per client thread and posts one
multipart body encoded once; the direct latency is measured in fresh processes, before and
after the servers. Prints a Markdown table (the progress and load average on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
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


def _form(a: str, b: str) -> tuple[bytes, str]:
    """The multipart body of one /v1/distance request, encoded once for every request."""
    boundary = "perceptual-engine-bench"
    body = bytearray()
    for field, path in (("a", a), ("b", b)):
        with open(path, "rb") as fh:
            data = fh.read()
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                 f'filename="{os.path.basename(path)}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict) -> None:
    conn.request("POST", "/v1/distance", body, headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")


def load(port: int, a: str, b: str, concurrency: int, requests: int, name: str) -> Row:
    """``requests`` requests per client thread, ``concurrency`` threads, after a warm-up.

    The load generator is kept light, since it shares the machine's cores with the server:
    one keep-alive connection per thread (http.client) and the multipart body encoded once.
    """
    body, ctype = _form(a, b)
    headers = {"Content-Type": ctype}
    deadline = time.monotonic() + 60
    while True:  # the baseline says "serving" just before uvicorn binds
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            _post(conn, body, headers)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for _ in range(3):
        _post(conn, body, headers)
    conn.close()
    lat: list[float] = []

    def work(conn: http.client.HTTPConnection) -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            _post(conn, body, headers)
            lat.append(time.perf_counter() - t0)
        conn.close()

    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(concurrency)]
    for c in conns:
        c.connect()
    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return Row(name, concurrency, len(lat), 1000 * statistics.median(lat),
               1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], len(lat) / wall)


def direct_p50(model: str, a: str, b: str, repeat: int = 50, spin: bool = True) -> float:
    """ms: read both files, decode them (as load_image does) and one Engine.distance, the
    median of ``repeat`` after 5 warm-up calls. Run it in a process of its own
    (``--direct``): one that has just exported with torch, or holds a server, is not idle.
    spin: the Engine's (True: the default Engine; the server's runs with False)."""
    from ..images import decode_bytes
    from ..runtime import Engine

    engine = Engine(model, device="cpu", spin=spin)
    times = []
    for i in range(repeat + 5):
        t0 = time.perf_counter()
        with open(a, "rb") as fa, open(b, "rb") as fb:
            x, y = decode_bytes(fa.read(), "a")[None], decode_bytes(fb.read(), "b")[None]
        engine.distance(x, y)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _direct_in_process(model: str, a: str, b: str) -> tuple[float, float]:
    """(default Engine, Engine(spin=False)) p50s, each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    got = []
    for spin in ("spin", "nospin"):
        out = subprocess.run([sys.executable, "-m", "perceptual_engine.bench.serve", "--direct", model, a, b,
                              spin], capture_output=True, text=True, env=env, check=True).stdout
        got.append(float(out.split()[-1]))
    return got[0], got[1]


def interleaved_c1(port: int, model: str, a: str, b: str, blocks: int = 12, per_block: int = 12) -> dict[str, float]:
    """p50 ms of one request to the server at concurrency 1 and of read + decode +
    Engine.distance in this process (the default Engine, and spin=False as the server runs
    it), measured in alternating blocks so that the machine's other load weighs on each alike."""
    import gc

    from ..images import decode_bytes
    from ..runtime import Engine

    body, ctype = _form(a, b)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    engines = {"default": Engine(model, device="cpu"), "spin=False": Engine(model, device="cpu", spin=False)}

    def direct(engine) -> None:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            x, y = decode_bytes(fa.read(), "a")[None], decode_bytes(fb.read(), "b")[None]
        engine.distance(x, y)

    calls = {"served": lambda: _post(conn, body, {"Content-Type": ctype}),
             "direct, default Engine": lambda: direct(engines["default"]),
             "direct, Engine(spin=False)": lambda: direct(engines["spin=False"])}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(5):
            fn()
    for _ in range(blocks):
        for name, fn in calls.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t0))
    conn.close()
    del engines
    gc.collect()
    return {k: statistics.median(v) for k, v in times.items()}


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


def run(model: str, a: str, b: str, concurrency: list[int],
        requests: int) -> tuple[list[Row], list[tuple[float, float]], dict[str, float]]:
    """The rows of the three servers, the direct p50 measured before and after them, and
    the interleaved concurrency-1 comparison on the batching server."""
    direct = [_direct_in_process(model, a, b)]
    print(f"direct p50 {direct[0]} ms", file=sys.stderr, flush=True)
    rows, inter = [], {}
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
            if flags == ["--max-batch", "16"]:
                inter = interleaved_c1(port, model, a, b)
                print(f"interleaved p50 {inter}", file=sys.stderr, flush=True)
            for c in concurrency:
                rows.append(load(port, a, b, c, max(8, requests // c), name))
                print(rows[-1], f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        finally:
            _stop(proc)
    direct.append(_direct_in_process(model, a, b))
    print(f"direct p50 {direct[1]} ms", file=sys.stderr, flush=True)
    return rows, direct, inter


def markdown(rows: list[Row], direct: list[tuple[float, float]], inter: dict[str, float]) -> str:
    lines = ["| server | concurrency | requests | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.server} | {r.concurrency} | {r.requests} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
              f"{r.throughput:.1f} |" for r in rows]
    (b0, b1), (a0, a1) = direct
    lines.append("\nDirect: read + decode + Engine.distance of one pair, in a process of its own, p50: "
                 f"default Engine {b0:.1f} ms before the servers, {a0:.1f} ms after them; "
                 f"Engine(spin=False), as the server runs it, {b1:.1f} ms before, {a1:.1f} ms after.")
    if inter:
        lines.append("\nConcurrency 1 in alternating blocks (batching server; direct calls in the load "
                     "generator's process), p50: " + ", ".join(f"{k} {v:.1f} ms" for k, v in inter.items())
                     + f"; served / direct default Engine {inter['served'] / inter['direct, default Engine']:.2f}x.")
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
    p.add_argument("--direct", nargs=4, metavar=("MODEL", "A", "B", "SPIN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.direct:
        model, a, b, spin = args.direct
        print(f"{direct_p50(model, a, b, spin=spin == 'spin'):.3f}")
        return 0
    if args.baseline_app:
        baseline_app(args.baseline_app[0], int(args.baseline_app[1]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:  # exported in a process of its own: torch stays out of this one
            model = os.path.join(tmp, "lpips.onnx")
            subprocess.run([sys.executable, "-c", "import sys; from perceptual_engine import lpips; "
                            "from perceptual_engine.export import export_onnx; export_onnx("
                            "lpips.default_spec('random'), sys.argv[1], graph='lpips')", model],
                           check=True, env={**os.environ, "PYTHONPATH": SRC + os.pathsep
                                            + os.environ.get("PYTHONPATH", "")})
        a, b = _images(tmp, args.size)
        rows, direct, inter = run(model, a, b, [int(c) for c in args.concurrency.split(",")], args.requests)
    print(markdown(rows, direct, inter))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
