"""Memory: the estimate, the budget, the refusal before a call, out-of-memory errors,
and the folder run that keeps going past a pair too large for the budget.

No test allocates more than a few MB: budgets are set small instead of images large.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import FeatureSpec, memory
from perceptual_engine.cli.main import main
from perceptual_engine.datasets.pairs import Pair
from perceptual_engine.datasets.runner import run_pairs
from perceptual_engine.errors import ConfigError, InputError, MemoryBudgetError, OutOfMemoryError
from perceptual_engine.runtime import Engine


# -- the estimate ----------------------------------------------------------------------
def _by_hand(per_image_live: float, images: int, h: int, w: int) -> int:
    body = 4 * images * per_image_live
    inputs = 4 * images * 3 * h * w * 2
    return int(memory.MARGIN * (body + inputs)) + memory.FIXED


def test_estimate_matches_the_layer_table_by_hand():
    spec = FeatureSpec(arch="vgg19", layers=("relu1_1", "relu2_1"), weights="random")
    h, w, n = 37, 53, 3
    e1 = 64 * 37 * 53  # conv1_1, relu1_1, conv1_2, relu1_2 (full size)
    ep = 64 * 18 * 26  # pool1: floor(37/2) x floor(53/2)
    e2 = 128 * 18 * 26  # conv2_1, relu2_1
    tap = memory.TAP["features"]
    live = {  # WORK·e_l + taps held so far, per layer in order
        "conv1_1": memory.WORK * e1,
        "relu1_1": memory.WORK * e1 + tap * e1,
        "conv1_2": memory.WORK * e1 + tap * e1,
        "relu1_2": memory.WORK * e1 + tap * e1,
        "pool1": memory.WORK * ep + tap * e1,
        "conv2_1": memory.WORK * e2 + tap * e1,
        "relu2_1": memory.WORK * e2 + tap * (e1 + e2),
    }
    est = memory.estimate(spec, "features", n, h, w)
    assert est.images == n and est.deepest == "relu2_1"
    assert est.peak_layer == max(live, key=live.get)
    assert est.total == _by_hand(max(live.values()), n, h, w)
    # A pair graph runs 2N images and keeps more per tap.
    tap = memory.TAP["distance"]
    pair_live = max(memory.WORK * e1 + tap * e1, memory.WORK * e2 + tap * (e1 + e2))
    assert memory.estimate(spec, "distance", n, h, w).total == _by_hand(pair_live, 2 * n, h, w)
    # With a gradient every activation is kept, plus the backward's tensors of x (N images).
    every = 4 * e1 + ep + 2 * e2
    grad_live = every + memory.GRAD_WORK * every  # per image: N images, all differentiated
    assert memory.estimate(spec, "features", n, h, w, grad=True).total == _by_hand(grad_live, n, h, w)
    # A pair: 2N images keep their activations, only x's N are differentiated.
    pair_grad = (2 * n * every + n * memory.GRAD_WORK * every) / (2 * n)
    assert memory.estimate(spec, "distance", n, h, w, grad=True).total == \
        _by_hand(pair_grad, 2 * n, h, w)
    # A style layer adds its Gram's copies while it is computed, and to the backward.
    tap = memory.TAP["target"]
    styled = max(memory.WORK * e1 + tap * e1 + memory.GRAM * e1,  # relu1_1: tap and Gram
                 memory.WORK * e1 + tap * e1, memory.WORK * e2 + tap * e1)
    est = memory.estimate(spec, "target", n, h, w, taps=("relu1_1",), grams=("relu1_1",))
    assert est.total == _by_hand(styled, n, h, w) and est.peak_layer == "relu1_1"
    est = memory.estimate(spec, "target", n, h, w, taps=("relu1_1",), grams=("relu1_1",), grad=True)
    assert est.total == _by_hand(every + memory.GRAD_WORK * every + memory.GRAM * e1, n, h, w)


def test_estimate_grows_with_everything_that_costs_memory():
    shallow = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
    deep = FeatureSpec(weights="random")

    def total(spec=deep, graph="distance", n=2, h=96, w=80, **kw):
        return memory.estimate(spec, graph, n, h, w, **kw).total

    assert total(n=1) < total(n=2) < total(n=3)
    assert total(h=64) < total(h=96) < total(h=128)
    assert total(w=64) < total(w=80)
    assert total(graph="features") < total(graph="distance")
    assert total(spec=shallow) <= total(spec=deep)  # the peak is at the first block
    assert total(spec=shallow, grad=True) < total(spec=deep, grad=True)
    assert total() < total(grad=True)
    assert total(dtype="float16", device="cuda") < total(dtype="float32", device="cuda")
    assert total(dtype="float16", device="cpu") == total(dtype="float32", device="cpu")
    assert total() < total(arena=True) == total(device="cuda")
    assert total(graph="some-future-kind") >= total(graph="distance")  # unknown: costed as a pair
    with pytest.raises(ConfigError, match="int8"):
        total(dtype="int8")


def test_parse_budget_accepts_sizes_shares_and_off():
    P = memory.parse_budget
    assert P(None) == ("fraction", memory.DEFAULT_FRACTION)
    assert P("4G") == P("4GiB") == P("4gb") == ("bytes", 4 * 2**30)
    assert P("512M") == ("bytes", 512 * 2**20)
    assert P("1.5G") == ("bytes", 1.5 * 2**30)
    assert P("1000") == P(1000) == ("bytes", 1000)
    assert P("50%") == P(0.5) == ("fraction", 0.5)
    assert P(0) == P(False) == P("off") == P("0") == ("off", 0.0)
    for bad in ("4X", "-1G", "150%", "0%", "G", 1.5, -3):
        with pytest.raises(ConfigError, match="memory budget"):
            P(bad)


def test_available_memory_reads_the_machine():
    avail = memory.available_memory("cpu")
    assert isinstance(avail, int) and avail > 0


def test_automatic_budget_reads_available_memory_only_for_large_calls(monkeypatch):
    reads = []

    def fake_available(device, device_id):
        reads.append(device)
        return 1 << 30

    monkeypatch.setattr(memory, "available_memory", fake_available)
    guard = memory.MemoryGuard(None)
    spec = FeatureSpec(layers=("relu1_2",), weights="random")
    guard.check(memory.estimate(spec, "distance", 1, 64, 64))  # far below CHECK_ABOVE
    assert reads == []
    big = memory.estimate(spec, "distance", 1, 1024, 1024)
    assert big.total > 0.8 * (1 << 30)
    with pytest.raises(MemoryBudgetError, match=r"over the memory budget of 819\.2 MiB \(80% of the av") as err:
        guard.check(big)
    assert err.value.estimate == big.total and err.value.budget == int(0.8 * (1 << 30))
    guard.check(memory.estimate(spec, "distance", 1, 512, 512))  # within: reading reused
    assert reads == ["cpu"]


# -- the engine -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(distance_model):
    return Engine(distance_model[0], device="cpu")


def test_engine_refuses_a_call_over_its_budget(distance_model, make_images):
    x, y = make_images((2, 3, 37, 45), seed=1), make_images((2, 3, 37, 45), seed=2)
    eng = Engine(distance_model[0], device="cpu", memory_budget="1M")
    need = eng.estimate_memory(2, 37, 45)
    assert need.images == 4 and need.graph == "distance"
    with pytest.raises(MemoryBudgetError, match=r"needs about .* over the memory budget of 1\.0 MiB"
                       r".*smaller images or a smaller batch") as err:
        eng.distance(x, y)
    assert isinstance(err.value, InputError)
    assert (err.value.estimate, err.value.budget) == (need.total, 2**20)
    eng.memory_budget = need.total  # exactly enough
    assert eng.distance(x, y)["total"].shape == (2,)
    eng.memory_budget = 0  # no budget
    assert eng.memory_limit() is None
    assert eng.distance(x, y)["total"].shape == (2,)


def test_an_allocation_failure_in_onnx_runtime_is_a_typed_error(engine, make_images, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    def run(*args, **kwargs):  # the message ONNX Runtime gave under a real address-space limit
        raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                               "returned while running Conv node. Name:'relu_nchwc' Status "
                               "Message: std::bad_alloc")

    x = make_images((1, 3, 33, 41), seed=3)
    monkeypatch.setattr(engine.session, "run", run)
    with pytest.raises(OutOfMemoryError, match=r"ran out of memory on CPUExecutionProvider .*"
                       r"bad_alloc.* needed about .*smaller images") as err:
        engine.distance(x, x)
    assert err.value.estimate == engine.estimate_memory(1, 33, 41).total
    assert isinstance(err.value, MemoryError)

    def other(*args, **kwargs):
        raise RuntimeException("[ONNXRuntimeError] : 6 : some other failure")

    monkeypatch.setattr(engine.session, "run", other)
    with pytest.raises(RuntimeException, match="some other failure"):
        engine.distance(x, x)
    assert memory.is_out_of_memory(RuntimeError("Failed to allocate memory for requested buffer"))
    assert memory.is_out_of_memory(RuntimeError("CUDA failure 2: out of memory"))


# -- the folder run ---------------------------------------------------------------------
def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_batches_are_sized_under_the_budget(engine, tmp_path, monkeypatch):
    pairs = [Pair(_png(tmp_path / f"a{i}.png", 29, 35, i), _png(tmp_path / f"b{i}.png", 29, 35, 9 + i))
             for i in range(5)]
    fits_two = engine.estimate_memory(2, 29, 35).total
    assert engine.estimate_memory(3, 29, 35).total > fits_two
    monkeypatch.setattr(engine, "memory_budget", fits_two)
    assert memory.fit_batch(engine, 29, 35, 8) == 2
    calls = []
    real = engine.distance
    monkeypatch.setattr(engine, "distance", lambda x, y: calls.append(len(x)) or real(x, y))
    rows = []
    stats = run_pairs(engine, pairs, [rows.append], batch_size=8, workers=1)
    assert stats.ok == 5 and sorted(calls, reverse=True) == [2, 2, 1]


def test_a_pair_over_the_budget_is_an_error_row_and_the_run_goes_on(distance_model, tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    for i in range(3):
        _png(a / f"s{i}.png", 37, 45, i), _png(b / f"s{i}.png", 37, 45, 20 + i)
    _png(a / "z_large.png", 301, 290, 7), _png(b / "z_large.png", 301, 290, 8)
    eng = Engine(distance_model[0], device="cpu")
    small, large = eng.estimate_memory(1, 37, 45).total, eng.estimate_memory(1, 301, 290).total
    budget = (small + large) // 2
    out = tmp_path / "rows.jsonl"
    argv = ["distance", str(a), str(b), "--model", distance_model[0], "--device", "cpu",
            "--memory-budget", str(budget), "--output", str(out), "--format", "csv"]
    assert main(argv) == 1
    rows = {json.loads(line)["a"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert [k for k, r in rows.items() if not r["error"]] == ["s0.png", "s1.png", "s2.png"]
    err = rows["z_large.png"]["error"]
    assert f"over the memory budget of {memory.format_bytes(budget)}" in err
    assert "--max-side" in err and "--memory-budget" in err and "Engine(" not in err
    side = int(err.split("--max-side ")[1].split()[0])
    assert 37 < side < 301 and eng.estimate_memory(1, side, side).total <= budget
    assert "Traceback" not in capsys.readouterr().err
    # Downscaled to the suggested side, every pair fits.
    out.unlink()
    assert main(argv + ["--max-side", str(side)]) == 0
    assert all(not json.loads(line)["error"] for line in out.read_text().splitlines())


def test_an_out_of_memory_pair_costs_only_itself(engine, tmp_path, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    pairs = [Pair(_png(tmp_path / f"a{i}.png", 31, 31, i), _png(tmp_path / f"b{i}.png", 31, 31, 5 + i))
             for i in range(3)]
    pairs.insert(1, Pair(_png(tmp_path / "big_a.png", 64, 48, 1), _png(tmp_path / "big_b.png", 64, 48, 2)))
    real = engine.session.run

    def run(names, feeds, *args):
        if feeds["x"].shape[2] == 64:
            raise RuntimeException("Failed to allocate memory for requested buffer of size 123456789")
        return real(names, feeds, *args)

    monkeypatch.setattr(engine.session, "run", run)
    rows = []
    stats = run_pairs(engine, pairs, [rows.append], batch_size=8, workers=1)
    assert (stats.ok, stats.failed) == (3, 1)
    (bad,) = [r for r in rows if r["error"]]
    assert "big_a" in bad["a"] and "ran out of memory" in bad["error"] and "--max-side" in bad["error"]


def test_bad_memory_budget_flag_is_a_usage_error(capsys):
    assert main(["distance", "a.png", "b.png", "--memory-budget", "lots"]) == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_limit_side_keeps_the_aspect_ratio(make_images):
    from perceptual_engine.images import limit_side

    x = make_images((1, 3, 301, 150), seed=4)[0]
    assert limit_side(x, 100).shape == (3, 100, 50)
    assert limit_side(x, 400) is x and limit_side(x, None) is x
    assert limit_side(make_images((1, 3, 5, 1000), seed=5)[0], 10).shape == (3, 1, 10)
