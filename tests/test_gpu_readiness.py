"""The GPU path, checked on a CPU machine: what ONNX Runtime and torch would be asked
(provider options captured, sessions and CUDA calls faked), as docs/gpu.md describes;
scripts/gpu_check.py proves the same on a GPU."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from perceptual_engine.runtime import gpu_libs
from perceptual_engine.runtime import iobinding as IOB
from perceptual_engine.runtime import providers as P
from perceptual_engine.runtime.providers import ProviderOptions


# -- TensorRT profile from the graph's inputs ---------------------------------------------------


def _dynamic_inputs(path: str) -> set[str]:
    graph = onnx.load(path, load_external_data=False).graph
    return {i.name for i in graph.input
            if any(d.dim_param or not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)}


@pytest.mark.parametrize("fixture", ["target_grad_cache", "style_model", "distance_model"])
def test_engine_profiles_every_dynamic_input_of_the_graph(fixture, request, monkeypatch):
    from perceptual_engine import Engine

    seen = []
    real = P.plan

    def spy(device, options, inputs, key):
        seen.extend(inputs)
        return real(device, options, inputs, key)

    monkeypatch.setattr(P, "plan", spy)
    value = request.getfixturevalue(fixture)
    path = value[2] if fixture == "target_grad_cache" else value[0]
    Engine(path, "cpu")
    names = {i.name for i in seen}
    assert names == _dynamic_inputs(path)  # the Grams of style and target graphs are static
    if fixture == "target_grad_cache":
        assert names == {"x", "target.content.relu1_2"}
    opts = P.tensorrt_options(ProviderOptions(cache_dir="/tmp/unused"), seen, "k")
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        assert {s.split(":")[0] for s in opts[key].split(",")} == names


# -- TensorRT library probe -------------------------------------------------------------------


@pytest.fixture
def fake_cdll(monkeypatch):
    """ctypes.CDLL as seen by gpu_libs.py (its probes are re-exported by providers.py): loads
    only what ``ok`` says, records calls."""
    calls = []

    def make(ok):
        def cdll(name, mode=0):
            calls.append((name, mode))
            if not ok(name):
                raise OSError(f"{name}: cannot open shared object file")
            return SimpleNamespace(name=name)

        monkeypatch.setattr(gpu_libs.ctypes, "CDLL", cdll)
        return calls

    return make


def test_tensorrt_probe_loads_pip_tensorrt_libs_first_by_absolute_path(tmp_path, monkeypatch, fake_cdll):
    libs = tmp_path / "site" / "tensorrt_libs"
    libs.mkdir(parents=True)
    for lib in P.TENSORRT_LIBS:
        (libs / lib).write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    calls = fake_cdll(lambda name: name.startswith(str(libs)))  # nothing on the loader's path
    assert P.tensorrt_loadable() == (True, "")
    assert [c[0] for c in calls] == [str(libs / lib) for lib in P.TENSORRT_LIBS]
    assert all(mode == ctypes.RTLD_GLOBAL for _, mode in calls)  # the EP then finds them by soname


def test_tensorrt_probe_names_the_missing_onnx_parser(fake_cdll):
    assert "libnvonnxparser.so.10" in P.TENSORRT_LIBS and "libnvinfer_plugin.so.10" in P.TENSORRT_LIBS
    fake_cdll(lambda name: "nvonnxparser" not in name)  # a system TensorRT without its parser
    ok, why = P.tensorrt_loadable()
    assert not ok and why.startswith("libnvonnxparser.so.10 is not loadable")


# -- CUDA library hint ------------------------------------------------------------------------


@pytest.mark.parametrize("major, wheels", [
    (12, ["nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-curand-cu12"]),
    (13, ["nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-curand"]),
])
def test_cuda_library_hint_follows_the_build_and_includes_curand(fake_cdll, major, wheels):
    fake_cdll(lambda name: False)
    missing = P.missing_cuda_libraries(major)
    assert missing == [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}",
                       "libcurand.so.10", "libcudnn.so.9"]
    assert P.cuda_wheels(missing, major) == wheels


def test_cuda_major_read_from_the_onnxruntime_build():
    from onnxruntime.capi import build_and_package_info as info

    want = getattr(info, "cuda_version", "") or None
    assert P.ort_cuda_major() == (int(want.split(".")[0]) if want else None)


# -- side effects -----------------------------------------------------------------------------


def test_preload_dlls_output_goes_to_stderr_not_stdout(monkeypatch, capsys):
    import onnxruntime

    def noisy():
        print("Failed to load libcudnn.so.9")  # what onnxruntime's preload_dlls does

    monkeypatch.setattr(onnxruntime, "preload_dlls", noisy, raising=False)
    P.preload_cuda()
    out, err = capsys.readouterr()
    assert out == "" and "Failed to load libcudnn.so.9" in err


def test_info_probe_keeps_preload_output_off_stdout(monkeypatch, capsys):
    import onnxruntime

    from perceptual_engine.cli import info

    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: print("Failed to load libcublas.so.13"),
                        raising=False)
    monkeypatch.setattr(P, "cuda_gpu_count", lambda: (1, ""))
    info.probe_provider("CUDAExecutionProvider")  # loads or not: its reason is returned, not printed
    out, err = capsys.readouterr()
    assert "Failed to load" not in out and "Failed to load" in err


def test_gpu_memory_reading_imports_no_torch():
    code = ("import sys; from perceptual_engine import memory; "
            "memory.available_memory('cuda'); memory.MemoryGuard(0.5, 'cuda').limit(); "
            "from perceptual_engine.runtime import providers as P; "
            "P.with_torch_stream(P.ProviderOptions()); print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gpu_memory_guard_reads_the_driver(monkeypatch):
    from perceptual_engine import memory
    from perceptual_engine import cuda_driver

    monkeypatch.setattr(cuda_driver, "free_memory", lambda device_id=0: 7 << 30)
    assert memory.available_memory("cuda", 0) == 7 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: pytest.fail("torch must not be asked"))
    assert memory.MemoryGuard(0.5, "cuda").limit() == int(0.5 * (7 << 30))


# -- torch's stream -------------------------------------------------------------------------


def test_user_stream_is_torchs_only_when_asked_and_torch_already_uses_cuda(monkeypatch):
    stream = SimpleNamespace(cuda_stream=0xBEEF)
    shared = ProviderOptions(share_torch_stream=True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert P.with_torch_stream(shared).user_stream is None
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    assert P.with_torch_stream(ProviderOptions()).user_stream is None  # off by default (docs/gpu.md)
    o = P.with_torch_stream(shared)
    assert o.user_stream == 0xBEEF
    assert P.cuda_options(o)["user_compute_stream"] == str(0xBEEF)
    assert P.with_torch_stream(ProviderOptions(user_stream=5)).user_stream == 5  # the caller's choice
    assert P.with_torch_stream(ProviderOptions(share_torch_stream=False)).user_stream is None


# -- IO binding: streams and CUDA-graph capture, with fakes ------------------------------------


class FakeStream:
    def __init__(self, ptr):
        self.cuda_stream, self.syncs = ptr, 0

    def synchronize(self):
        self.syncs += 1


class FakeBinding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_input(self, name, device, index, dtype, shape, ptr):
        self.inputs[name] = shape

    def bind_output(self, name, device, index, dtype, shape, ptr):
        self.outputs[name] = shape


class FakeSession:
    """Records each run: its thread, run options and whether a capture held the gate."""

    def __init__(self, delay=0.0):
        self.runs, self.delay = [], delay

    def io_binding(self):
        return FakeBinding()

    def run_with_iobinding(self, binding, run_options=None):
        self.runs.append((threading.get_ident(), run_options, IOB.GATE.held_exclusive))
        time.sleep(self.delay)


class FakeEngine:
    def __init__(self, options, session=None, graph_session=None):
        self.options = options
        self.session = session or FakeSession()
        self.graph_sessions = []
        self._graph_session = graph_session
        self.spec = SimpleNamespace(arch="vgg19")
        self.output_names = ("total",)
        self.info = SimpleNamespace(graph="distance")

    def _open_graph_session(self):
        s = self._graph_session or FakeSession()
        self.graph_sessions.append(s)
        return s


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch's CUDA stream calls answered on the CPU: current stream 0x10, syncs counted."""
    stream = FakeStream(0x10)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return stream


def _feeds(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 3, 37, 45, generator=g), "y": torch.rand(n, 3, 37, 45, generator=g)}


def test_iobinding_on_torchs_stream_skips_both_host_syncs(fake_cuda):
    eng = FakeEngine(ProviderOptions(user_stream=0x10))
    out = IOB.TorchBinder(eng).run(_feeds(), {}, ("total",))
    assert out["total"].shape == (2,)
    (_, run_options, _), = eng.session.runs
    assert fake_cuda.syncs == 0
    assert run_options is not None
    assert run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"


def test_iobinding_on_another_stream_synchronizes(fake_cuda):
    eng = FakeEngine(ProviderOptions(user_stream=None))
    IOB.TorchBinder(eng).run(_feeds(), {}, ("total",))
    (_, run_options, _), = eng.session.runs
    assert fake_cuda.syncs == 1 and run_options is None  # ORT then syncs its own stream at the end


def test_cuda_graph_captures_once_on_one_thread_under_the_process_gate(fake_cuda):
    graph = FakeSession()
    eng = FakeEngine(ProviderOptions(cuda_graph=True, fixed_shapes=True), graph_session=graph)
    binder = IOB.TorchBinder(eng)
    errors = []

    def call(seed):
        try:
            binder.run(_feeds(seed=seed), {}, ("total",))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(eng.graph_sessions) == 1  # one capture for the process's callers
    assert len(graph.runs) == IOB.CAPTURE_RUNS + 5  # warm-up and capture, then 5 replays
    assert len({tid for tid, _, _ in graph.runs}) == 1  # every graph run on the binder's thread
    assert threading.get_ident() not in {tid for tid, _, _ in graph.runs}
    captures = [held for _, _, held in graph.runs[:IOB.CAPTURE_RUNS]]
    assert captures == [True] * IOB.CAPTURE_RUNS and not any(h for _, _, h in graph.runs[IOB.CAPTURE_RUNS:])
    binder.close()


def test_other_engines_wait_while_a_graph_is_captured(fake_cuda):
    graph = FakeSession(delay=0.3)  # a slow capture
    capturing = IOB.TorchBinder(FakeEngine(ProviderOptions(cuda_graph=True), graph_session=graph))
    other = FakeEngine(ProviderOptions())
    t = threading.Thread(target=capturing.run, args=(_feeds(), {}, ("total",)))
    t.start()
    deadline = time.time() + 5
    while not IOB.GATE.held_exclusive and time.time() < deadline:
        time.sleep(0.005)
    assert IOB.GATE.held_exclusive
    IOB.TorchBinder(other).run(_feeds(), {}, ("total",))  # blocks until the capture ends
    t.join()
    (_, _, held), = other.session.runs
    assert not held and len(graph.runs) == IOB.CAPTURE_RUNS
    capturing.close()


class WritingBinding(FakeBinding):
    def __init__(self):
        super().__init__()
        self.calls, self.ptrs = [], {}

    def bind_input(self, name, device, index, dtype, shape, ptr):
        self.calls.append(("in", name, device))
        super().bind_input(name, device, index, dtype, shape, ptr)

    def bind_output(self, name, device, index, dtype, shape, ptr):
        self.calls.append(("out", name, device))
        self.ptrs[name] = (ptr, shape)
        super().bind_output(name, device, index, dtype, shape, ptr)


class WritingSession(FakeSession):
    """Writes run number k into every bound output, by pointer, as ONNX Runtime would."""

    def __init__(self):
        super().__init__()
        self.bindings = []

    def io_binding(self):
        self.bindings.append(WritingBinding())
        return self.bindings[-1]

    def run_with_iobinding(self, binding, run_options=None):
        super().run_with_iobinding(binding, run_options)
        for ptr, shape in binding.ptrs.values():
            value = np.full(shape, float(len(self.runs)), dtype=np.float32)
            ctypes.memmove(ptr, value.ctypes.data, value.nbytes)


def test_iobinding_reuses_one_binding_and_its_outputs_once_results_are_dropped(fake_cuda):
    eng = FakeEngine(ProviderOptions(), session=WritingSession())
    eng.output_names = ("content.relu1_2", "total")
    binder, feeds = IOB.TorchBinder(eng), _feeds()
    names = eng.output_names
    first = binder.run(feeds, {}, names)
    ptr = first["content.relu1_2"].data_ptr()
    assert float(first["total"][0]) == 1.0
    del first  # dropped: its slot is free again
    second = binder.run(feeds, {}, names)
    assert second["content.relu1_2"].data_ptr() == ptr and float(second["total"][0]) == 2.0
    (binding,) = eng.session.bindings  # one binding, outputs bound once, inputs once (same pointers)
    assert [c for c in binding.calls if c[0] == "out"] == [("out", "content.relu1_2", "cuda"),
                                                           ("out", "total", "cpu")]
    assert [c[1] for c in binding.calls if c[0] == "in"] == ["x", "y"]
    del second
    binder.run(_feeds(seed=1), {}, names)  # new input tensors: only the inputs are bound again
    assert [c[1] for c in binding.calls if c[0] == "in"] == ["x", "y", "x", "y"]


def test_iobinding_reuses_buffers_only_on_the_stream_that_used_them(fake_cuda, monkeypatch):
    """A result dropped on one stream may still be read by work queued there: a call from
    another stream gets its own buffers, and the first stream reuses its own."""
    eng = FakeEngine(ProviderOptions(), session=WritingSession())
    eng.output_names = ("content.relu1_2", "total")
    binder, feeds = IOB.TorchBinder(eng), _feeds()
    first = binder.run(feeds, {}, eng.output_names)
    ptr = first["content.relu1_2"].data_ptr()
    del first
    other = FakeStream(0x20)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: other)
    second = binder.run(feeds, {}, eng.output_names)
    assert second["content.relu1_2"].data_ptr() != ptr
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake_cuda)
    third = binder.run(feeds, {}, eng.output_names)
    assert third["content.relu1_2"].data_ptr() == ptr


@pytest.mark.parametrize("hold", ["dict", "view", "numpy"])
def test_iobinding_never_overwrites_results_the_caller_still_holds(fake_cuda, hold):
    eng = FakeEngine(ProviderOptions(), session=WritingSession())
    eng.output_names = ("content.relu1_2", "total")
    binder, feeds, names = IOB.TorchBinder(eng), _feeds(), eng.output_names
    first = binder.run(feeds, {}, names)
    kept = {"dict": first, "view": {k: v[:1] for k, v in first.items()},
            "numpy": {k: v.numpy() for k, v in first.items()}}[hold]
    del first
    later = [binder.run(feeds, {}, names) for _ in range(IOB.SLOTS_PER_SHAPE + 2)]  # pool and beyond
    assert all(float(v.reshape(-1)[0]) == 1.0 for v in kept.values())  # still run 1's values
    assert [float(r["total"][0]) for r in later] == [2.0, 3.0, 4.0, 5.0]
    assert len({r["total"].data_ptr() for r in later}) == len(later)  # held results: distinct buffers


def test_finite_check_reads_the_total_onnx_runtime_copied_to_the_host(fake_cuda):
    from perceptual_engine.errors import NonFiniteError
    from perceptual_engine.runtime.finite import _check_finite

    eng = FakeEngine(ProviderOptions(), session=WritingSession())
    out = IOB.TorchBinder(eng).run(_feeds(), {}, ("total",))
    assert isinstance(out.host_total, np.ndarray) and out.host_total.tolist() == [1.0, 1.0]
    assert out["total"].tolist() == [1.0, 1.0]  # the caller's total, filled from the host copy
    out.host_total[1] = np.nan  # what the host copy says is what is checked: no device read
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[1\]"):
        _check_finite(out)
    shared = FakeEngine(ProviderOptions(user_stream=0x10), session=WritingSession())
    out = IOB.TorchBinder(shared).run(_feeds(), {}, ("total",))  # torch's stream: nothing waited for
    assert out.host_total is None and ("out", "total", "cuda") in shared.session.bindings[0].calls


def test_gate_excludes_shared_holders_during_exclusive():
    gate, order = IOB.Gate(), []
    with gate.shared():
        t = threading.Thread(target=lambda: gate.exclusive().__enter__() or order.append("exclusive"))
        t.start()
        time.sleep(0.05)
        order.append("shared done")  # the exclusive side is still waiting for this holder
    t.join()
    assert order == ["shared done", "exclusive"]


# -- bench: gradient rows and provider failures -------------------------------------------------


def test_bench_grad_rule_forgives_sparse_reroutes_only():
    from perceptual_engine.bench import variants as V
    from perceptual_engine.bench import workloads as W

    rng = np.random.default_rng(0)
    ref = {"total": rng.random(2) + 1, "grad.x": rng.standard_normal((2, 3, 37, 45))}
    rerouted = dict(ref, **{"grad.x": ref["grad.x"].copy()})
    flat = rerouted["grad.x"].reshape(-1)
    flat[rng.choice(flat.size, flat.size // 200, replace=False)] += 1.0  # 0.5% moved, a lot
    off = dict(ref, **{"grad.x": ref["grad.x"] * 1.001})  # wrong everywhere, a little
    forgive = V.GRAD_FORGIVE["fp32"]
    assert W.max_rel_error(rerouted, ref) == 0.0  # grad.x judged apart
    assert W.grad_rel_error(rerouted, ref, 0.0) > 0.1  # unforgiven: far off
    assert W.grad_rel_error(rerouted, ref, forgive) <= V.GRAD_TOLERANCE["fp32"]
    assert W.grad_rel_error(off, ref, forgive) > V.GRAD_TOLERANCE["fp32"]
    assert W.grad_rel_error({"total": ref["total"]}, ref, forgive) == float("inf")
    assert W.grad_rel_error({"total": ref["total"]}, {"total": ref["total"]}, forgive) is None
    for tier, tol in V.GRAD_TOLERANCE.items():
        assert tol >= V.TOLERANCE[tier]


def test_bench_provider_failure_is_failed_not_skipped(monkeypatch):
    from dataclasses import dataclass

    from perceptual_engine.bench import BenchConfig, run, variants
    from perceptual_engine.errors import DeviceError

    @dataclass(frozen=True)
    class _Refused(variants.TorchVariant):
        def runner(self, ctx, case):
            inner = variants.TorchRunner(ctx, case, "fp32")

            def build():
                raise DeviceError("device 'tensorrt' was requested but ONNX Runtime could not start "
                                  "TensorrtExecutionProvider (EP_FAIL: Users need to specify all the "
                                  "dynamic shape inputs with associated profiles)")

            inner.build = build  # type: ignore[method-assign]
            return inner

    monkeypatch.setitem(variants.REGISTRY, "refused", _Refused("refused", "a provider that fails", False))
    result = run(BenchConfig(workloads=("features",), variants=("torch-eager-fp32", "refused"), device="cpu",
                             sizes=(32,), batch_sizes=(1, 2), iters=1, warmup=0, input_sets=1,
                             layers=("relu1_1",), measure_peak=False))
    for batch in (1, 2):  # each case tries it again and fails
        row = result.row("refused", "features", 32, batch)
        assert row.status == "failed" and "EP_FAIL" in row.reason


# -- Gram normalizer in float16 ---------------------------------------------------------------


def test_gram_normalizer_survives_float16_counts(monkeypatch):
    """A float16 build that sums the normalizer's ones in float16 must not get inf (and so
    all-zero Grams): C·H·W = 64·32·32 = 65536 > 65504, float16's largest value."""
    from perceptual_engine import backward, losses

    f = torch.rand(1, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    want_g = losses.gram(f, "chw")
    want_c = backward.content_vjp(f, f * 0.5, torch.ones(1))
    ones_like = torch.ones_like
    monkeypatch.setattr(torch, "ones_like", lambda t, dtype=None, **kw: ones_like(t, dtype=torch.float16, **kw))
    got_g = losses.gram(f, "chw")
    assert got_g.abs().max() > 0  # a count of inf would zero it
    torch.testing.assert_close(got_g, want_g, rtol=1e-3, atol=0)
    for norm in ("chw", "hw"):
        factor = losses.gram_factor(f, norm).float()
        torch.testing.assert_close(factor, torch.tensor((64 if norm == "chw" else 1) * 32 * 32.0).rsqrt())
    torch.testing.assert_close(backward.content_vjp(f, f * 0.5, torch.ones(1)).float(), want_c, rtol=1e-3, atol=0)


# -- Triton precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("graph, grad, gram, want", [
    ("distance", False, "chw", "FP16"), ("distance", True, "chw", "FP32"),
    ("lpips", False, "chw", "FP32"), ("style", False, "none", "FP32"), ("target", True, "hw", "FP32"),
])
def test_triton_tensorrt_precision(graph, grad, gram, want):
    from perceptual_engine.export.triton import trt_precision

    loss = None if graph == "lpips" else SimpleNamespace(gram=gram, style={"relu1_2": 1.0})
    assert trt_precision(SimpleNamespace(graph=graph, grad=grad, loss=loss)) == want


# -- memory estimate: the GPU terms -------------------------------------------------------------


def test_memory_estimate_counts_workspace_and_the_graph_session():
    from perceptual_engine import memory
    from perceptual_engine.spec import FeatureSpec

    spec = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
    base = memory.estimate(spec, "distance", 2, 256, 256, device="cuda")
    ws = memory.estimate(spec, "distance", 2, 256, 256, device="cuda", workspace=256 << 20)
    two = memory.estimate(spec, "distance", 2, 256, 256, device="cuda", sessions=2)
    assert ws.total - base.total == 256 << 20
    assert two.total > 1.8 * (base.total - memory.FIXED)
    cpu = memory.estimate(spec, "distance", 2, 256, 256, device="cpu", workspace=1 << 30, sessions=2)
    assert cpu.total == memory.estimate(spec, "distance", 2, 256, 256, device="cpu").total


# -- stylize keeps x on the engine's device -----------------------------------------------------


def test_stylize_moves_x_to_the_engines_gpu_and_asks_for_a_cuda_graph(monkeypatch):
    from perceptual_engine.runtime import loss as L

    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: moved.append(kw) or self)
    gpu = SimpleNamespace(on_gpu=True, options=ProviderOptions(device_id=1))
    x = np.random.default_rng(0).random((1, 3, 37, 45), dtype=np.float32)
    t = L.on_engine_device(gpu, x)
    assert isinstance(t, torch.Tensor) and moved == [{"device": "cuda:1", "dtype": torch.float32}]
    assert L.on_engine_device(SimpleNamespace(on_gpu=False), x) is x  # the CPU path: unchanged
    assert L.stylize_options("cuda") == ProviderOptions(fixed_shapes=True, cuda_graph=True)
    assert L.stylize_options("auto") is None and L.stylize_options("cpu") is None


def test_optimize_image_returns_host_arrays_from_a_device_tensor(monkeypatch):
    """optimize_image copies x to the host with .cpu() (a CUDA x has no .numpy())."""
    from perceptual_engine.optimize import optimize_image

    calls = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))

    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return {"total": ((x - 0.25) ** 2).flatten(1).sum(1)}

    x0 = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    r = optimize_image(Quadratic(), x0, steps=3)
    assert calls and r.image.shape == (1, 3, 7, 9) and r.final_loss < r.initial_loss


# -- float16 limits are labelled as CPU arithmetic ------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_export_prints_that_fp16_errors_are_cpu_float32_arithmetic(tmp_path, monkeypatch, capsys, dtype):
    from perceptual_engine import export as E
    from perceptual_engine.cli import main
    from perceptual_engine.export.exporter import ExportResult
    from perceptual_engine.export.verify import OutputError

    def fake_export(spec, path, **kw):
        return ExportResult(str(path), "features", kw["dtype"], ("x",), ("relu1_1",),
                            {"relu1_1": OutputError(1e-3, 2e-3)}, 1000, "ab" * 32, 0.1)

    monkeypatch.setattr(E, "export_onnx", fake_export)
    assert main(["export", "--weights", "random", "--layers", "relu1_1", "--dtype", dtype,
                 "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert ("computes float16 convolutions, ReLUs and pools in float32" in out) == (dtype == "float16")


def test_gpu_session_creation_holds_the_gate_shared(features_model, monkeypatch):
    """A session allocates on the GPU: it waits for, and blocks, a CUDA-graph capture."""
    import onnxruntime as ort

    from perceptual_engine import Engine
    from perceptual_engine.errors import DeviceError

    monkeypatch.setattr(P, "plan", lambda *a, **k: [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})])
    monkeypatch.setattr(P, "preload_cuda", lambda: None)
    held = []

    def session(*a, **k):
        held.append(IOB.GATE._shared)
        raise RuntimeError("no CUDA-capable device is detected")

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(DeviceError):
        Engine(features_model[0], "cuda")
    assert held == [1] and IOB.GATE._shared == 0
