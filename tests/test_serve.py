"""perceptual-engine serve against a real server on loopback, with a real HTTP client.

One server with two replicas for the module (Ray start-up is slow): parity with
Engine.distance, every bad request (and the server answering afterwards), concurrency with
batching, a replica killed under load while the other answers, and SIGTERM with requests
in flight (last: it stops the server).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402

from perceptual_engine import Engine, load_image  # noqa: E402
from perceptual_engine.serve import Client  # noqa: E402
from perceptual_engine.serve.client import ServerError  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TOKEN = "t0ken-for-the-tests-0123456789"
PARITY_RTOL = 1e-6  # the same Engine on the same arrays: equal up to float32 summation order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _png(path: Path, h: int, w: int, seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (h, w, 4) if mode == "RGBA" else (h, w, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a few bytes of data: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "b0undary7"
    body = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _call(url: str, *, body: bytes | None = None, ctype: str | None = None, token: str | None = TOKEN,
          method: str | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    headers = {"Content-Type": ctype} if ctype else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


class Server:
    def __init__(self, proc, url, folder, model):
        self.proc, self.url, self.folder, self.model = proc, url, folder, model

    def healthz(self) -> dict:
        status, body, _ = _call(self.url + "/healthz", timeout=10)
        assert status == 200, body
        return body


def _start_server(model: str, folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "perceptual_engine.cli", "serve", "--model", model, "--port", str(port),
         "--token-file", str(folder / "token"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 150
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            break
    if not line.startswith("serving "):
        proc.kill()
        pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
    assert line.strip() == f"serving http://127.0.0.1:{port}"
    return proc, f"http://127.0.0.1:{port}"


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def server(lpips_fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model = lpips_fp32[0]  # LPIPS with inputs in [-1, 1], spatial map and grad.x outputs
    (folder / "token").write_text(TOKEN + "\n")
    for i, (h, w) in enumerate(((37, 45), (37, 45), (45, 37))):
        _png(folder / f"img{i}.png", h, w, seed=i, mode="RGBA" if i == 1 else "RGB")
    proc, url = _start_server(model, folder, "--replicas", "2", "--max-batch", "8", "--max-body-mb", "1",
                              "--max-pixels", "1000000", "--max-pairs", "8")
    yield Server(proc, url, folder, model)
    _stop_server(proc)


def test_refused_before_start_up(features_model, lpips_fp32, tmp_path, capsys):
    from perceptual_engine.cli.main import main

    assert main(["serve", "--model", features_model[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a features graph; serve needs a model that compares" in err
    assert main(["serve", "--model", lpips_fp32[0], "--host", "0.0.0.0"]) == 2
    assert "--token-file" in capsys.readouterr().err
    (tmp_path / "short").write_text("abc")
    assert main(["serve", "--model", lpips_fp32[0], "--token-file", str(tmp_path / "short")]) == 2
    assert "16 characters or more" in capsys.readouterr().err


def test_parity_with_engine_distance(server):
    a, b, c = (server.folder / f"img{i}.png" for i in range(3))
    got = Client(server.url, token=TOKEN).distance(a, b)
    engine = Engine(server.model, device="cpu")
    x, y = (2 * load_image(p) - 1 for p in (a, b))  # the model's inputs are in [-1, 1]
    want = engine.distance(x, y)
    assert got["model"]["kind"] == "lpips" and len(got["model"]["sha256"]) == 64
    assert set(got["terms"]) == {k for k in want if k.startswith("lpips.")}
    for name, value in {**got["terms"], "total": got["total"]}.items():
        assert value == pytest.approx(float(want[name][0]), rel=PARITY_RTOL, abs=0), name
    # Many pairs of two sizes in one request: grouped by size, never resized.
    batch = Client(server.url, token=TOKEN).distance_batch([(a, b), (c, c), (b, a)])
    totals = [p["total"] for p in batch["pairs"]]
    assert totals[0] == pytest.approx(float(want["total"][0]), rel=PARITY_RTOL) and totals[1] == 0.0
    assert totals[2] == pytest.approx(totals[0], rel=1e-5)  # LPIPS is symmetric up to rounding
    model = Client(server.url, token=TOKEN).model()
    assert model["kind"] == "lpips" and model["max_batch"] == 8 and model["input_range"] == "-1,1"


def test_bad_requests_are_json_4xx_and_the_server_stays_up(server):
    img = (server.folder / "img0.png").read_bytes()
    other = (server.folder / "img2.png").read_bytes()
    gif = server.folder / "x.gif"
    Image.fromarray(np.full((40, 40), 7, np.uint8), "L").save(gif)
    url = server.url + "/v1/distance"
    cases = {
        "missing field b": (_multipart([("a", "a.png", img)]), 400, "missing file field 'b'"),
        "b sent as text": (_multipart([("a", "a.png", img), ("b", None, b"hello")]), 400, "is text"),
        "not an image": (_multipart([("a", "a.png", img), ("b", "b.png", b"just text")]), 400,
                         "not an image in an accepted format"),
        "unsupported format": (_multipart([("a", "a.png", img), ("b", "x.gif", gif.read_bytes())]), 400,
                               "is a GIF file; accepted formats"),
        "decompression bomb": (_multipart([("a", "a.png", img), ("b", "bomb.png", _bomb_png(50000, 50000))]),
                               400, "decompression bomb"),
        "over --max-pixels": (_multipart([("a", "a.png", img), ("b", "big.png", _bomb_png(2000, 2000))]),
                              400, "over the budget of 1000000"),
        "oversized body": (_multipart([("a", "a.png", img), ("b", "b.png", b"\0" * (1 << 20))]), 413,
                           "accepted: at most"),
        "mismatched sizes": (_multipart([("a", "a.png", img), ("b", "b.png", other)]), 422,
                             "sizes differ: a 'a.png' is 37x45, b 'b.png' is 45x37"),
        "too small": (_multipart([("a", "a.png", _png_bytes(8, 8)), ("b", "b.png", _png_bytes(8, 8))]), 422,
                      "too small"),
    }
    for what, (body, status, words) in cases.items():
        got, answer, _ = _call(url, body=body[0], ctype=body[1])
        assert (got, words in answer.get("error", "")) == (status, True), (what, answer)
        assert server.healthz()["status"] == "ready", what
    for what, kwargs, status in (
            ("no token", dict(token=None), 401), ("wrong token", dict(token="x" * 30), 401),
            ("form-urlencoded", dict(body=b"a=1", ctype="application/x-www-form-urlencoded"), 415),
            ("unknown route", dict(method="GET"), 404)):
        target = url if what != "unknown route" else server.url + "/v2/nothing"
        body = kwargs.pop("body", _multipart([("a", "a.png", img), ("b", "b.png", img)])[0])
        got, answer, headers = _call(target, body=body if what != "unknown route" else None,
                                     ctype=kwargs.pop("ctype", _multipart([])[1]), **kwargs)
        assert got == status and isinstance(answer.get("error"), str), (what, answer)
        assert server.healthz()["status"] == "ready", what
    unequal = _multipart([("a", "a.png", img), ("a", "a.png", img), ("b", "b.png", img)])[0]
    got, answer, _ = _call(url + "/batch", body=unequal, ctype=_multipart([])[1])
    assert got == 400 and "2 file(s) a and 1 b" in answer["error"]


def _png_bytes(h: int, w: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _batch_counts(url: str) -> tuple[float, float]:
    """(engine calls of one pair, engine calls), summed over both replicas: /metrics answers
    for the replica that serves the scrape, so it is scraped until both have answered."""
    seen: dict[str, tuple[float, float]] = {}
    for _ in range(40):
        req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        values, replica = {}, None
        for line in text.splitlines():
            if (line.startswith("perceptual_engine_batch_size_") and "_created" not in line
                    and ('le="1.0"' in line or "_count" in line)):
                values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
        seen[replica] = (values["perceptual_engine_batch_size_bucket"],
                         values["perceptual_engine_batch_size_count"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def test_concurrent_requests_are_batched_and_correct(server):
    a, b = server.folder / "img0.png", server.folder / "img1.png"
    client = Client(server.url, token=TOKEN)
    want = client.distance(a, b)["total"]
    ones_before, calls_before = _batch_counts(server.url)
    results: list = []

    def work():
        for _ in range(4):
            results.append(client.distance(a, b)["total"])

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 64 and all(r == pytest.approx(want, rel=1e-5) for r in results)
    ones, calls = _batch_counts(server.url)
    assert calls - calls_before < 64  # fewer engine calls than requests: some batch held > 1 pair
    assert (calls - calls_before) - (ones - ones_before) > 0


def _load(server, stop: threading.Event, out: list, timeout: float = 40) -> None:
    """Post pairs until ``stop``; record (200, an HTTP error status or 'no answer', seconds,
    when it was sent)."""
    a, b = server.folder / "img0.png", server.folder / "img1.png"
    client = Client(server.url, token=TOKEN, timeout=timeout, retries=0)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client.distance(a, b)
            out.append((200, time.monotonic() - t0, t0))
        except ServerError as exc:
            out.append((exc.status or "no answer", time.monotonic() - t0, t0))
            if not exc.status:  # the server is gone: nothing more to learn
                return


def _pids(server, calls: int = 12) -> set[int]:
    """The replica pids that answer /healthz within ``calls`` calls (Serve spreads them)."""
    return {server.healthz()["pid"] for _ in range(calls)}


def test_a_killed_replica_fails_only_its_requests_and_the_other_answers(server):
    pids = _pids(server)
    assert len(pids) == 2, pids
    victim = min(pids)
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(server, stop, out)) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    statuses = {s for s, _, _ in out}
    assert statuses <= {200, 500, 502, 503}, out
    assert max(d for _, d, _ in out) < 40
    # The other replica kept answering: requests sent a second after the kill succeeded.
    later = [s for s, _, t0 in out if t0 > killed_at + 1.0]
    assert later and set(later) == {200}, out
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve's controller starts a new replica
        try:
            if _pids(server, 4) - pids:
                break
        except (AssertionError, OSError, ValueError):
            pass
        time.sleep(0.5)
    assert _pids(server) - pids, "no new replica"
    print(f"killed replica: {sorted(((str(s), sum(1 for x, _, _ in out if x == s)) for s in statuses))}")


def test_sigterm_drains_requests_in_flight_and_stops_every_process(server):
    started = _descendants(server.proc.pid)
    assert started, "the server started no processes?"
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(server, stop, out, 60)) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(90)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert code == 143, server.proc.stderr.read()[-2000:]
    assert "terminated (SIGTERM)" in server.proc.stderr.read()
    statuses = {s for s, _, _ in out}
    assert 200 in statuses and statuses <= {200, 500, 502, 503, "no answer"}, out
    time.sleep(2)
    left = [p for p in started if _alive(p)]
    assert not left, f"processes left after SIGTERM: {left}"
    print(f"SIGTERM: {sorted(((str(s), sum(1 for x, _, _ in out if x == s)) for s in statuses))}")


# -- the replica's parts, without a server ----------------------------------------------------
def test_pixel_budget_holds_pairs_until_there_is_room():
    import asyncio

    from perceptual_engine.serve.batching import PixelBudget

    async def main():
        budget, order = PixelBudget(10), []

        async def pair(name, n, seconds):
            async with budget.hold(n):
                order.append(f"{name}+")
                assert budget.held <= budget.cap
                await asyncio.sleep(seconds)
                order.append(f"{name}-")

        await asyncio.gather(pair("a", 6, 0.05), pair("b", 6, 0.0), pair("c", 4, 0.0))
        return order, budget.held

    order, held = asyncio.run(main())
    assert held == 0
    assert order.index("b+") > order.index("a-")  # 6 + 6 > 10: b waited for a
    assert order.index("c+") < order.index("a-")  # 6 + 4 fit: c ran beside a


def test_a_runtime_error_fails_only_its_pair():
    from perceptual_engine.serve.batching import run_pairs

    class Flaky:  # an engine whose runtime fails on any call holding the poisoned pair
        spec = None

        def distance(self, x, y):
            if (x == 7).any():
                raise RuntimeError("onnxruntime: Non-zero status code")
            return {"total": x.reshape(len(x), -1).mean(1)}

    pairs = [(np.full((3, h, 5), v, np.float32),) * 2 for v, h in ((1, 4), (7, 4), (2, 4), (3, 6))]
    out = run_pairs(Flaky(), pairs, ["total"], max_batch=8)
    assert isinstance(out[1], RuntimeError)
    assert [o["total"] for i, o in enumerate(out) if i != 1] == [1.0, 2.0, 3.0]


def test_header_pixels_reads_sizes_without_decoding():
    from perceptual_engine.serve.uploads import header_pixels

    assert header_pixels(_bomb_png(5000, 4000)) == 5000 * 4000  # 60 MB decoded; 100 bytes sent
    assert header_pixels(b"not an image") == 0  # decoding refuses it (400), holding nothing
    assert header_pixels(_bomb_png(50000, 50000)) == 0  # Pillow's own bomb guard: decoding refuses


def test_held_pixels_below_one_pair_is_refused():
    from perceptual_engine.errors import ConfigError
    from perceptual_engine.serve.config import Limits

    with pytest.raises(ConfigError, match="below one pair of max_pixels images"):
        Limits(max_pixels=100, max_held_pixels=150)
