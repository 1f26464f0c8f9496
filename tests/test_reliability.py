"""Faults and load: a killed export, one Engine shared by threads."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx

SPEC = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=3)
LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 0.5})


@pytest.fixture(scope="module")
def distance_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rel") / "d.onnx"
    export_onnx(SPEC, path, graph="distance", loss=LOSS)
    return str(path)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# The child exports over an existing model and stops at a chosen point of the
# write (``stage``), announcing it, so the parent can kill it exactly there.
CHILD = textwrap.dedent(
    """
    import sys, time, onnx
    import perceptual_engine.export.exporter as ex
    from perceptual_engine import FeatureSpec, export_onnx
    stage, path = sys.argv[1], sys.argv[2]
    real_save = onnx.save_model
    def save(proto, tmp, *a, **k):
        if stage == "writing":
            data = proto.SerializeToString()
            with open(tmp, "wb") as fh:
                fh.write(data[: len(data) // 2]); fh.flush()
            print("READY", flush=True); time.sleep(60)
        real_save(proto, tmp, *a, **k)
    def verify(*a, **k):
        print("READY", flush=True); time.sleep(60)
    ex.onnx.save_model = save
    ex.verify_model = verify
    export_onnx(FeatureSpec(layers=("relu1_1",), weights="random", seed=9), path)
    """
)


@pytest.mark.parametrize("stage", ["writing", "verifying"])
def test_killed_export_leaves_previous_model_intact(tmp_path, distance_model, stage):
    path = tmp_path / "model.onnx"
    path.write_bytes(open(distance_model, "rb").read())
    before = _sha(path)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, stage, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _sha(path) == before
    # The previous model still loads and runs.
    eng = Engine(path, device="cpu")
    x = np.random.default_rng(0).random((1, 3, 19, 23), dtype=np.float32)
    assert np.isfinite(eng.distance(x, x[:, :, ::-1].copy())["total"]).all()


def test_one_engine_shared_by_8_threads_matches_sequential(distance_model):
    eng = Engine(distance_model, device="cpu")
    rng = np.random.default_rng(1)
    shapes = [(1, 16, 16), (2, 21, 17), (3, 18, 25)]
    inputs = []
    for i in range(200):
        n, h, w = shapes[i % 3]
        inputs.append((rng.random((n, 3, h, w), dtype=np.float32),
                       rng.random((n, 3, h, w), dtype=np.float32)))
    expected = [eng.distance(x, y)["total"] for x, y in inputs]
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            order = list(range(200))[k:] + list(range(200))[:k]  # each thread its own order
            got = [None] * 200
            for i in order:
                got[i] = eng.distance(*inputs[i])["total"]
            results[k] = got
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    for got in results.values():
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    assert len(results) == 8


def _pngs(folder, n, seed):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (24, 28) if i % 2 else (30, 22)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")


def test_cli_parallel_decoding_matches_serial(distance_model, tmp_path, capsys):
    import csv

    from perceptual_engine.cli import main

    _pngs(tmp_path / "a", 12, 1)
    _pngs(tmp_path / "b", 12, 2)
    rows = {}
    for workers in ("1", "4"):
        out = tmp_path / f"w{workers}.csv"
        code = main(["distance", str(tmp_path / "a"), str(tmp_path / "b"), "--model", distance_model,
                     "--workers", workers, "--batch-size", "3", "--output", str(out), "--format", "csv"])
        capsys.readouterr()
        assert code == 0
        with open(out) as fh:
            rows[workers] = {r["a"]: r["total"] for r in csv.DictReader(fh)}
    assert len(rows["1"]) == 12 and rows["1"] == rows["4"]


def test_model_cache_shared_by_processes_exports_once(tmp_path):
    _pngs(tmp_path / "a", 2, 3)
    _pngs(tmp_path / "b", 2, 4)
    cmd = [sys.executable, "-m", "perceptual_engine.cli", "distance", str(tmp_path / "a"),
           str(tmp_path / "b"), "--layers", "relu1_1,relu1_2", "--weights", "random",
           "--content", "relu1_2=1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
           "--format", "csv"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    exporting = sum("exporting the distance model" in err for _, err in outs)
    assert exporting == 1, [e for _, e in outs]
    totals = {tuple(sorted(line for line in out.splitlines()[1:])) for out, _ in outs}
    assert len(totals) == 1  # all three computed the same rows with the same model


@pytest.mark.parametrize("graph", ["style", "target"])
def test_target_swap_under_4_threads_never_leaves_no_target(tmp_path, graph):
    """set_style_target / set_target while 4 threads call distance: each call sees the
    old target or the new one (its result equals one of the two), never none."""
    import threading

    from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx

    spec = FeatureSpec(arch="vgg16", layers=("relu1_2",), weights="random", seed=5)
    loss = LossConfig(style={"relu1_2": 1.0}) if graph == "style" else \
        LossConfig(content={"relu1_2": 1.0}, style={"relu1_2": 1.0})
    path = str(tmp_path / f"{graph}.onnx")
    export_onnx(spec, path, graph=graph, loss=loss)
    engine = Engine(path, device="cpu")
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 9, 11), dtype=np.float32)
    targets = [rng.random((1, 3, 9, 11), dtype=np.float32) for _ in range(2)]

    def set_target(t):
        if graph == "style":
            engine.set_style_target(t)
        else:
            engine.set_target(content=t, style=t)

    expected = []
    for t in targets:
        set_target(t)
        expected.append(float(engine.distance(x)["total"][0]))
    assert expected[0] != expected[1]
    errors, seen = [], []
    stop = threading.Event()

    def call():
        while not stop.is_set():
            try:
                seen.append(float(engine.distance(x)["total"][0]))
            except Exception as exc:  # any failure is the bug this test is about
                errors.append(exc)
                return

    threads = [threading.Thread(target=call) for _ in range(4)]
    for th in threads:
        th.start()
    for k in range(60):
        set_target(targets[k % 2])
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert seen
    assert all(any(abs(v - e) <= 1e-5 * abs(e) for e in expected) for v in seen)


def test_file_lock_leaves_no_file_and_keeps_one_holder(tmp_path):
    """The lock file is removed on release; threads (separate open files, as processes
    have) racing on it, the removal included, never hold it two at a time."""
    from perceptual_engine._io import file_lock

    path = str(tmp_path / ".out.npy.lock")
    inside, overlaps, entries = [0], [], [0]

    def work():
        for _ in range(40):
            with file_lock(path):
                inside[0] += 1
                overlaps.append(inside[0] > 1)
                time.sleep(0.0005)
                entries[0] += 1
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert entries[0] == 160 and not any(overlaps)
    assert os.listdir(tmp_path) == []


def _terminate_when(cmd, ready, timeout=120.0):
    """Start the command line ``cmd``, send SIGTERM once ``ready()`` is true, return
    (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "perceptual_engine.cli", *map(str, cmd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "never reached the point to terminate it at"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("command", ["matrix", "export"])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, distance_model, command):
    """SIGTERM in the middle of the work: exit 143, one line, and nothing left behind:
    no spilled embeddings, no half-written export, no lock, no output."""
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    if command == "matrix":
        images, spill = tmp_path / "images", tmp_path / "spill"
        images.mkdir()
        spill.mkdir()
        rng = np.random.default_rng(0)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(images / f"{i:03d}.png")
        cmd = ["matrix", images, "--model", distance_model, "-o", out / "m.npy", "--spill-dir", spill,
               "--memory-budget", "24M", "--batch-size", "2"]
        ready = lambda: any(spill.iterdir())  # noqa: E731  (the spill folder's first moment)
    else:
        spill = None
        cmd = ["export", "--weights", "random", "--layers", "relu1_2", "-o", out / "m.onnx"]
        ready = lambda: any(p.name.endswith(".tmp") for p in out.iterdir())  # noqa: E731
    code, err = _terminate_when(cmd, ready)
    assert code == 143, err
    assert err.strip().splitlines()[-1].startswith("perceptual-engine: terminated (SIGTERM)"), err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []
    if spill is not None:
        assert list(spill.iterdir()) == [], err
