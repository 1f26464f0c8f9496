#!/usr/bin/env python3
"""The first GPU run in one command (docs/gpu.md): parity first, then timings.

    python3 scripts/gpu_check.py --out $OUT                 # on the GPU machine
    python3 scripts/gpu_check.py --dry-run --out /tmp/gc    # anywhere: the same stages on the CPU

Stages, in this order, each within what is left of --budget-s (default 450 s, one
8-minute device call with room for the install and the reports):

1. tests     the GPU tests (tests/test_gpu.py, tests/test_lpips_gpu.py)
2. parity    strict fp32 / TF32 (NCHW and NHWC) / fp16 forward; gradient tiers with
             the bench's grad.x rule; LPIPS fp32 and fp16; DISTS when the package has it
3. ab        the CUDA provider options, A/B, on features, distance and train at 224²,
             batch 8, each row checked against float32 (scripts/gpu_check_ab.py), within
             --ab-budget-s; CPU placement, the NHWC graph, top kernels
4. layout    prefer_nhwc on against off, per precision, and the GPU memory each takes
5. graph     placement log (CPU nodes, Memcpy) with and without enable_cuda_graph;
             CUDA-graph replay against the plain run; IO binding on torch's stream
             against a synchronized one; capture while another thread runs
6. bench     the benchmark's GPU table with the matrix-product peaks of the same run
             (a subprocess, stopped at the budget: the rows measured so far are kept)

Writes gpu_check.json (everything) and gpu_check.md (the tables) under --out; a
check that raises is recorded with its error and the script goes on.
``scripts/gpu_check_rows.py gpu_check.json`` turns them into a BENCHMARKS.md section.

onnxruntime-gpu does not fit in one call: ``--ort-parts DIR`` assembles the wheel
from the parts carried there (GPU.md), installs it with ``--wheels DIR`` (lpips,
DISTS_pytorch) into --site, and runs the checks with them on the path.
Exit status: 0 when every check passed, 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_check_ab, gpu_check_diag

from gpu_check_diag import stderr_to  # noqa: E402

FULL_LAYERS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4")  # the bench's default network
DRY_LAYERS = ("relu1_1", "relu1_2")  # no pooling: the cheapest exports
GPU_VARIANTS = ("torch-eager-fp32", "torch-fp16-cl", "torch-bf16-cl", "torch-compile", "torch-compile-fp16-cl",
                "torch-fp16-cl-autotune", "ort-cuda-fp32", "ort-cuda-tf32", "ort-cuda-fp16", "ort-cuda-iobinding",
                "ort-cuda-tf32-iobinding", "ort-cuda-graph", "ort-cuda-fp16-iobinding", "ort-cuda-fp16-nhwc",
                "ort-cuda-fp16-graph")
STAGES = ("tests", "parity", "ab", "layout", "graph", "bench")
# Seconds each stage may take on the GPU (the dry run keeps only the run's budget). With the
# default --budget-s 450 the bench gets the rest, about 110 s: its first workloads, distance,
# train and features; a second call with --skip tests,parity,ab,layout,graph measures the rest.
STAGE_S = {"tests": 80.0, "parity": 90.0, "ab": 120.0, "layout": 20.0, "graph": 30.0}
# The most asked-for first: the bench stage stops at the budget and keeps the rows so far.
GPU_WORKLOADS = ("distance", "train", "features", "lpips", "dists", "stylize-step")


class Check:
    """Runs named checks, records value or error and time, keeps the budget."""

    def __init__(self, out: str, budget_s: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.stage_deadline = float("inf")
        self.results: dict = {"dry_run": dry_run, "checks": {}}

    def left(self) -> float:
        """Seconds left: of the run, or of the current stage when that ends first."""
        return min(self.deadline, self.stage_deadline) - time.perf_counter()

    @contextlib.contextmanager
    def stage(self, seconds: float | None):
        """Checks started inside keep within ``seconds`` (None: the run's budget only)."""
        self.stage_deadline = float("inf") if seconds is None else time.perf_counter() + seconds
        try:
            yield
        finally:
            self.stage_deadline = float("inf")

    def record(self, name: str, fn, *, need_s: float = 0.0) -> object:
        entry: dict = {}
        if self.left() < need_s:
            entry = {"status": "not run", "reason": f"budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                value = fn()
                ok = value.pop("ok", True) if isinstance(value, dict) else True
                entry = {"status": "pass" if ok else "FAIL", "value": value}
            except Skip as exc:
                entry = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                entry = {"status": "FAIL", "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                         "trace": traceback.format_exc()[-2000:]}
            entry["seconds"] = round(time.perf_counter() - t, 2)
        self.results["checks"][name] = entry
        shown = entry.get("value", entry.get("error", entry.get("reason")))
        print(f"[{name}] {entry['status']}: {json.dumps(shown, default=str)[:400]}", flush=True)
        return entry.get("value")


class Skip(Exception):
    """A check that cannot run here (a package or a GPU missing): skipped, not failed."""


# -- setup ------------------------------------------------------------------------------------

def install_carried(parts: str | None, wheels: str | None, site: str) -> None:
    """Assemble onnxruntime-gpu from ``parts`` (part.* and WHEEL_NAME, ort-gpu-parts.sh)
    and install it and the wheels in ``wheels`` into ``site`` (no dependencies)."""
    todo = []
    if parts:
        names = sorted(glob.glob(os.path.join(parts, "part.*")))
        wheel_name = open(os.path.join(parts, "WHEEL_NAME")).read().strip()
        if not names:
            raise SystemExit(f"gpu_check: no part.* files in {parts}")
        wheel = os.path.join(parts, wheel_name)
        with open(wheel, "wb") as out:
            for name in names:
                with open(name, "rb") as fh:
                    out.write(fh.read())
        todo.append(wheel)
    if wheels:
        todo += sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, *todo],
                       check=True)


def environment(dry_run: bool) -> dict:
    import onnxruntime as ort
    import torch

    from perceptual_engine.runtime import providers as P

    P.preload_cuda()  # its messages go to stderr
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_build_cuda": P.ort_cuda_major(), "ort_providers": ort.get_available_providers(),
        "torch_cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "tensorrt": P.tensorrt_loadable(), "missing_cuda_libraries": P.missing_cuda_libraries(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "tf32_torch": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                       "cudnn": torch.backends.cudnn.allow_tf32},
        "dry_run": dry_run,
    }


# -- 1. tests -------------------------------------------------------------------------------

def run_tests(check: Check) -> dict:
    import importlib.util

    if check.dry_run:
        raise Skip("dry run: the GPU tests skip themselves without a GPU")
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed (carry its wheels: --wheels, docs/gpu.md)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_lpips_gpu.py",
           "-p", "no:cacheprovider"]
    limit = max(30.0, check.left() - 5)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"ok": False, "timeout_s": limit, "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    tail = (proc.stdout + proc.stderr)[-3000:]
    summary = re.findall(r"\d+ (?:passed|failed|skipped|error)", tail)
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": summary, "tail": tail}


# -- models ---------------------------------------------------------------------------------

class Models:
    """Exports through the benchmark's model cache (same spec, loss and cache folder), so
    the bench stage reuses them."""

    def __init__(self, cache_dir: str, layers: tuple[str, ...]) -> None:
        from perceptual_engine.bench import workloads as W
        from perceptual_engine.spec import FeatureSpec

        self.cache_dir = cache_dir
        self.spec = FeatureSpec(arch="vgg19", layers=layers, weights="random", seed=0)
        self.loss = W.get("train").loss(self.spec)  # content + style: the gradient workloads' loss
        self.paths: dict = {}

    def get(self, graph: str, dtype: str = "float32", grad: bool = False, loss=None) -> str:
        from perceptual_engine.datasets.cache import ensure_model

        loss = self.loss if loss is None else loss
        if graph == "features":
            loss = None
        key = (graph, dtype, grad, loss)
        if key not in self.paths:  # the bench's folder layout: models directly in cache_dir
            entry = ensure_model(self.spec, loss, dtype=dtype, graph=graph,
                                 folder=self.cache_dir, **({"grad": True} if grad else {}))
            self.paths[key] = entry.path
        return self.paths[key]


# -- 2. parity --------------------------------------------------------------------------------

def rel(got, want, forgive: float = 0.0) -> float:
    import numpy as np

    from perceptual_engine.export.verify import compare

    def host(v):
        return v if isinstance(v, np.ndarray) else v.detach().double().cpu().numpy()

    return compare(host(got), host(want), forgive).max_rel


class Parity:
    def __init__(self, check: Check, models: Models) -> None:
        import torch

        self.check, self.models = check, models
        self.dev = "cpu" if check.dry_run else "cuda"
        self.device = "cpu" if check.dry_run else "cuda"  # the Engine's
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference: strict float32
        torch.backends.cudnn.allow_tf32 = False
        g = torch.Generator(device=self.dev).manual_seed(0)
        n, h, w = (2, 37, 45) if check.dry_run else (4, 224, 160)
        self.x = torch.rand(n, 3, h, w, device=self.dev, generator=g)
        self.y = torch.rand(n, 3, h, w, device=self.dev, generator=g)
        self._ref: dict = {}

    def reference(self, grad: bool) -> dict:
        import torch

        from perceptual_engine import TorchPerceptualLoss
        from perceptual_engine.weights import load_weights

        if grad not in self._ref:
            ref = TorchPerceptualLoss(self.models.spec, self.models.loss,
                                      weights=load_weights(self.models.spec)).to(self.dev)
            x = self.x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = ref(x, self.y)
                if grad:
                    out["total"].sum().backward()
            want = {k: v.detach() for k, v in out.items()}
            if grad:
                want["grad.x"] = x.grad.detach()
            self._ref[grad] = want
        return self._ref[grad]

    def engine(self, path: str, **opts):
        from perceptual_engine import Engine
        from perceptual_engine.runtime import ProviderOptions

        return Engine(path, self.device, options=ProviderOptions(**opts))

    def forward(self, dtype: str, tier: str, tf32: bool, nhwc: bool) -> dict:
        from perceptual_engine.bench.variants import TOLERANCE

        eng = self.engine(self.models.get("distance", dtype), tf32=tf32, prefer_nhwc=nhwc)
        got, want = eng.distance(self.x, self.y), self.reference(False)
        errors = {k: rel(got[k], want[k]) for k in want}
        worst = max(errors.values())
        return {"ok": worst <= TOLERANCE[tier], "max_rel": worst, "limit": TOLERANCE[tier],
                "providers": eng.providers, "errors": errors}

    def gradient(self, dtype: str, tier: str, tf32: bool) -> dict:
        from perceptual_engine.bench.variants import GRAD_FORGIVE, GRAD_TOLERANCE, TOLERANCE

        eng = self.engine(self.models.get("distance", dtype, grad=True), tf32=tf32)
        got, want = eng.distance(self.x, self.y), self.reference(True)
        terms = max(rel(got[k], want[k]) for k in want if k != "grad.x")
        gx = rel(got["grad.x"], want["grad.x"], GRAD_FORGIVE[tier])
        import torch

        finite = bool(torch.isfinite(torch.as_tensor(got["grad.x"])).all())
        return {"ok": finite and terms <= TOLERANCE[tier] and gx <= GRAD_TOLERANCE[tier],
                "terms_max_rel": terms, "limit": TOLERANCE[tier], "grad_x": gx,
                "grad_limit": GRAD_TOLERANCE[tier], "grad_forgive": GRAD_FORGIVE[tier],
                "grad_x_unforgiven": rel(got["grad.x"], want["grad.x"]),
                "grad_x_forgive_0.1%": rel(got["grad.x"], want["grad.x"], 1e-3), "finite": finite}

    def lpips(self, dtype: str, limit: float) -> dict:
        import importlib.util

        import torch

        from perceptual_engine import lpips as L
        from perceptual_engine.export import export_onnx
        from perceptual_engine.reference import TorchLPIPS

        if importlib.util.find_spec("lpips") is None:
            raise Skip("the lpips package is not installed (carry its wheel: --wheels, docs/gpu.md)")
        spec = L.default_spec("random", input_range="-1,1")
        path = os.path.join(self.models.cache_dir, f"gpu-check-lpips-{dtype}.onnx")
        if not os.path.exists(path):
            export_onnx(spec, path, graph="lpips", dtype=dtype, grad=dtype == "float32")
        ref = TorchLPIPS(spec).to(self.dev)
        x, y = self.x * 2 - 1, self.y * 2 - 1
        with torch.no_grad():
            want = ref(x, y)
        got = self.engine(path, tf32=False).distance(x, y)
        errors = {k: rel(got[k], want[k]) for k in want}
        worst = max(errors.values())
        return {"ok": worst <= limit, "max_rel": worst, "limit": limit, "errors": errors}

    def dists(self) -> dict:
        import importlib

        try:
            importlib.import_module("perceptual_engine.dists")
        except ImportError:
            raise Skip("perceptual_engine.dists is not in this checkout") from None
        from perceptual_engine.export import export_onnx
        from perceptual_engine.export.graphs import GRAPH_KINDS

        if "dists" not in GRAPH_KINDS:
            raise Skip(f"no 'dists' graph kind in export ({', '.join(GRAPH_KINDS)})")
        dists = importlib.import_module("perceptual_engine.dists")
        spec = dists.default_spec("random")  # the module's spec helper, as lpips.default_spec
        path = os.path.join(self.models.cache_dir, "gpu-check-dists.onnx")
        if not os.path.exists(path):
            export_onnx(spec, path, graph="dists")
        from perceptual_engine import Engine

        want = Engine(path, "cpu").distance(self.x.cpu().numpy(), self.y.cpu().numpy())
        got = self.engine(path, tf32=False).distance(self.x, self.y)
        errors = {k: rel(got[k], want[k]) for k in want}
        terms = max(v for k, v in errors.items() if k != "total")
        # Single terms are 1 − a ratio near 1 (texture.input compares raw pixel statistics):
        # the H200 run had 1.8e-4 there from the CUDA reduction order, with total at 4.6e-7.
        return {"ok": errors["total"] <= 1e-4 and terms <= 1e-3, "total": errors["total"], "total_limit": 1e-4,
                "terms_max_rel": terms, "terms_limit": 1e-3, "vs": "the same model on ORT CPU", "errors": errors}


def run_parity(check: Check, models: Models) -> None:
    p = Parity(check, models)
    layouts = (False,) if check.dry_run else (False, True)
    for nhwc in layouts:
        lay = "nhwc" if nhwc else "nchw"
        check.record(f"parity.fwd.fp32-strict.{lay}", lambda n=nhwc: p.forward("float32", "fp32", False, n), need_s=20)
        if not check.dry_run:
            check.record(f"parity.fwd.tf32.{lay}", lambda n=nhwc: p.forward("float32", "tf32", True, n), need_s=20)
    check.record("parity.grad.fp32-strict", lambda: p.gradient("float32", "fp32", False), need_s=30)
    if not check.dry_run:  # float16 on the CPU runs in float32 (export/exporter.py FP16_CPU_NOTE)
        check.record("parity.fwd.fp16", lambda: p.forward("float16", "fp16", False, False), need_s=30)
        check.record("parity.grad.tf32", lambda: p.gradient("float32", "tf32", True), need_s=20)
        check.record("parity.grad.fp16", lambda: p.gradient("float16", "fp16", False), need_s=30)
        check.record("parity.lpips.fp32", lambda: p.lpips("float32", 1e-4), need_s=40)
        check.record("parity.lpips.fp16", lambda: p.lpips("float16", 1e-2), need_s=40)
    check.record("parity.dists", p.dists, need_s=30)


# -- 3. ab ---------------------------------------------------------------------------------------

def run_ab(check: Check, models: Models, budget_s: float) -> dict:
    import gpu_check_ab

    return gpu_check_ab.run_ab(models, check.dry_run, min(budget_s, max(0.0, check.left() - 5)))


def run_ab_stage(check: Check, models: Models, budget_s: float) -> None:
    ab = check.record("ab", lambda: run_ab(check, models, budget_s), need_s=min(60.0, budget_s))
    if isinstance(ab, dict) and ab.get("markdown"):
        check.results["ab_markdown"] = ab["markdown"]


# -- 4. layout ----------------------------------------------------------------------------

def timed(fn, iters: int = 10) -> float:
    """Median ms of ``fn`` after warm-up: CUDA events on a GPU, wall time on a CPU."""
    import statistics

    import torch

    for _ in range(2):
        fn()
    ms = []
    for _ in range(iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms)


def run_layout(check: Check, models: Models) -> None:
    if check.dry_run:
        check.record("layout.nhwc_vs_nchw", lambda: (_ for _ in ()).throw(Skip("dry run: no cuDNN layouts")))
        return
    import torch

    from perceptual_engine import Engine
    from perceptual_engine.runtime import ProviderOptions

    x = torch.rand(8, 3, 224, 224, device="cuda")
    y = torch.rand(8, 3, 224, 224, device="cuda")

    def compare(dtype: str, tf32: bool) -> dict:
        path = models.get("distance", dtype)
        p50, taken, estimate = {}, {}, None
        for nhwc in (False, True):
            torch.cuda.synchronize()
            free0 = torch.cuda.mem_get_info()[0]
            eng = Engine(path, "cuda", options=ProviderOptions(tf32=tf32, prefer_nhwc=nhwc, fixed_shapes=True))
            key = "nhwc" if nhwc else "nchw"
            p50[key] = timed(lambda e=eng: e.distance(x, y))
            taken[key] = (free0 - torch.cuda.mem_get_info()[0]) / 2**20  # the session, arena, workspace
            estimate = eng.estimate_memory(*x.shape[:1], *x.shape[2:]).total / 2**20
            del eng
        faster = min(p50, key=p50.get)
        return {"p50_ms": p50, "faster": faster, "nhwc_speedup": p50["nchw"] / p50["nhwc"],
                "default_is_right": faster == "nchw" or p50["nchw"] / p50["nhwc"] < 1.05,
                "gpu_mib_taken": taken, "estimate_mib": estimate}

    for dtype, tf32, name in (("float32", False, "fp32"), ("float32", True, "tf32"), ("float16", False, "fp16")):
        check.record(f"layout.{name}", lambda d=dtype, t=tf32: compare(d, t), need_s=30)


# -- 5. CUDA graphs, placement, streams ----------------------------------------------------------

def placement(path: str, logdir: str) -> dict:
    """Sessions with enable_cuda_graph 0 and 1 at VERBOSE: which nodes fall to the CPU,
    whether Memcpy nodes appear, whether the CUDA graph is accepted."""
    import onnxruntime as ort

    out = {}
    for graph_on in ("0", "1"):
        so = ort.SessionOptions()
        so.log_severity_level = 0
        so.log_verbosity_level = 1
        log = os.path.join(logdir, f"{os.path.basename(path)}.graph{graph_on}.log")
        try:
            with stderr_to(log):
                s = ort.InferenceSession(path, so, providers=[
                    ("CUDAExecutionProvider", {"enable_cuda_graph": graph_on}), "CPUExecutionProvider"])
            out[f"graph{graph_on}"] = {"providers": s.get_providers()}
        except Exception as exc:  # noqa: BLE001
            out[f"graph{graph_on}"] = {"error": str(exc).splitlines()[0][:400]}
        lines = open(log, errors="replace").read().splitlines()
        os.remove(log)  # VERBOSE logs are large: keep the lines that matter
        keep = [ln.strip()[-300:] for ln in lines if re.search(
            r"placed on \[CPU|Memcpy(FromHost|ToHost)|Force fallback|cannot use the|shape massaging", ln, re.I)]
        out[f"graph{graph_on}"]["log"] = keep[:80]
        out[f"graph{graph_on}"]["memcpy_nodes"] = sum("Memcpy" in ln for ln in keep)
    # Accepted: the CUDA graph session started and CUDA is its first provider (ORT's own
    # fallback could otherwise hand back a CPU session).
    out["ok"] = out["graph1"].get("providers", [""])[0] == "CUDAExecutionProvider"
    return out


def run_graph(check: Check, models: Models) -> None:
    if check.dry_run:
        check.record("graph", lambda: (_ for _ in ()).throw(Skip("dry run: no CUDA graphs on the CPU")))
        return
    import torch

    from perceptual_engine import Engine
    from perceptual_engine.runtime import ProviderOptions

    logdir = os.path.join(check.out, "placement")
    os.makedirs(logdir, exist_ok=True)
    for name, kw in (("distance32", dict(graph="distance")), ("distgrad32", dict(graph="distance", grad=True)),
                     ("targetgrad32", dict(graph="target", grad=True)), ("features16", dict(graph="features",
                                                                                           dtype="float16"))):
        check.record(f"graph.placement.{name}", lambda kw=kw: placement(models.get(**kw), logdir), need_s=15)

    x = torch.rand(4, 3, 224, 224, device="cuda")
    y = torch.rand(4, 3, 224, 224, device="cuda")
    path = models.get("distance", grad=True)

    def replay() -> dict:
        opts = dict(tf32=True, fixed_shapes=True)
        plain = Engine(path, "cuda", options=ProviderOptions(**opts))
        graph = Engine(path, "cuda", options=ProviderOptions(cuda_graph=True, **opts))
        t = time.perf_counter()
        first = graph.distance(x, y)
        capture_s = time.perf_counter() - t
        second = graph.distance(x, y)
        p = plain.distance(x, y)
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        err = max(rel(second[k], p[k]) for k in p)
        return {"ok": err <= 1e-5 and rel(second["grad.x"], first["grad.x"]) <= 1e-6,
                "capture_s": round(capture_s, 2), "replay_vs_plain": err,
                "p50_ms_numpy": timed(lambda: plain.distance(xn, yn)),
                "p50_ms_iobinding": timed(lambda: plain.distance(x, y)),
                "p50_ms_graph": timed(lambda: graph.distance(x, y))}

    check.record("graph.replay.distgrad32", replay, need_s=30)

    def streams() -> dict:
        opts = dict(tf32=True, fixed_shapes=True)
        shared = Engine(path, "cuda", options=ProviderOptions(share_torch_stream=True, **opts))  # torch's stream
        synced = Engine(path, "cuda", options=ProviderOptions(**opts))  # its own stream (the default)
        cur = torch.cuda.current_stream().cuda_stream
        a, b = shared.distance(x, y), synced.distance(x, y)
        err = max(rel(a[k], b[k]) for k in b)
        return {"ok": shared.options.user_stream == cur and err <= 1e-5, "shared_stream": shared.options.user_stream,
                "torch_stream": cur, "shared_vs_synced": err,
                "p50_ms_shared": timed(lambda: shared.distance(x, y)),
                "p50_ms_synced": timed(lambda: synced.distance(x, y))}

    check.record("graph.torch_stream", streams, need_s=20)

    def concurrency() -> dict:
        eng = Engine(models.get("distance"), "cuda", options=ProviderOptions(cuda_graph=True, fixed_shapes=True))
        plain = Engine(models.get("distance"), "cuda", options=ProviderOptions(fixed_shapes=True))
        errors, stop = [], threading.Event()
        xs = torch.rand(2, 3, 160, 192, device="cuda")

        def other():
            while not stop.is_set():
                try:
                    eng.distance(xs, xs)  # another shape: the main session
                    eng.distance(xs.cpu().numpy(), xs.cpu().numpy())  # the host path
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"other: {str(exc)[:300]}")
                    return

        th = threading.Thread(target=other)
        th.start()
        time.sleep(0.3)
        worst = 0.0
        try:
            for _ in range(4):
                got = eng.distance(x, y)
                worst = max(worst, rel(got["total"], plain.distance(x, y)["total"]))
                eng._binder.reset()  # a fresh capture each time
        except Exception as exc:  # noqa: BLE001
            errors.append(f"capture: {str(exc)[:300]}")
        stop.set()
        th.join()
        return {"ok": not errors and worst <= 1e-5, "errors": errors, "max_rel_vs_plain": worst}

    check.record("graph.capture_while_other_thread_runs", concurrency, need_s=20)


# -- 6. bench --------------------------------------------------------------------------------

def bench_command(dry_run: bool, cache_dir: str, out: str) -> list[str]:
    """The bench stage's command line."""
    if dry_run:
        args = ["--device", "cpu", "--workloads", "train,stylize-step",  # models parity made or cached
                "--variants", "torch-eager-fp32,ort-cpu", "--sizes", "32", "--batch-sizes", "1",
                "--layers", ",".join(DRY_LAYERS), "--iters", "1", "--warmup", "0", "--input-sets", "1"]
    else:
        # One point per workload (224², batch 8; stylize-step is batch 1), not --quick:
        # --quick leaves torch.compile out, and it is one of the peers a GPU user would write.
        args = ["--device", "cuda", "--sizes", "224", "--batch-sizes", "8", "--iters", "10",
                "--warmup", "2", "--input-sets", "2", "--workloads", ",".join(GPU_WORKLOADS),
                "--variants", ",".join(GPU_VARIANTS)]
    # The GPU table reports TFLOP/s against matrix-product peaks measured in the same run; the
    # dry run leaves them out (a CPU peak there would take longer than its rows).
    peak = ["--no-peak"] if dry_run else []
    return [sys.executable, "-m", "perceptual_engine.bench", *args, *peak, "--quiet",
            "--cache-dir", cache_dir, "--out", out]


def run_bench(check: Check, cache_dir: str) -> dict:
    out = os.path.join(check.out, "bench")
    cmd = bench_command(check.dry_run, cache_dir, out)
    limit = check.left() - 15  # room for the reports
    if limit < 20:
        raise Skip(f"budget: {check.left():.0f} s left")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the bench reports the rows measured so far
        stdout, stderr = proc.communicate(timeout=60)
        stopped = True
    rows = []
    path = os.path.join(out, "bench.json")
    if os.path.exists(path):
        rows = json.load(open(path)).get("rows", [])
    bad = [f"{r['variant']}/{r['workload']}: {r['status']}" for r in rows if r["status"] in ("WRONG", "failed")]
    return {"ok": proc.returncode in (0, 130) and not bad, "returncode": proc.returncode,
            "stopped_at_budget": stopped, "command": " ".join(cmd[1:]), "rows": len(rows),
            "wrong_or_failed": bad, "markdown": os.path.join(out, "bench.md") if os.path.exists(path) else None,
            "stderr_tail": stderr[-1500:]}


# -- report ----------------------------------------------------------------------------------

def to_markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"### GPU check ({'dry run, CPU' if results['dry_run'] else env.get('gpu')})", "",
             f"- onnxruntime {env.get('onnxruntime')} (CUDA {env.get('ort_build_cuda')}), torch {env.get('torch')}, "
             f"Python {env.get('python')}; load average at start {env.get('load_average')}",
             f"- Command: `{results.get('command')}`; wall time {results.get('wall_s')} s", "",
             "| check | status | result | s |", "|---|---|---|---|"]
    for name, e in results["checks"].items():
        v = e.get("value")
        if isinstance(v, dict):
            keys = ("max_rel", "terms_max_rel", "grad_x", "faster", "nhwc_speedup", "capture_s", "replay_vs_plain",
                    "p50_ms_iobinding", "p50_ms_graph", "p50_ms_shared", "p50_ms_synced", "summary", "rows",
                    "wrong_or_failed", "memcpy_nodes", "wrong", "errors")
            shown = "; ".join(f"{k} {_fmt(v[k])}" for k in keys if k in v)
            if "graph1" in v:
                shown = (f"CUDA graph {'accepted' if 'error' not in v['graph1'] else 'refused'}; "
                         f"Memcpy lines {v['graph0'].get('memcpy_nodes')}")
        else:
            shown = e.get("error") or e.get("reason") or ""
        lines.append(f"| {name} | {e['status']} | {str(shown)[:300].replace('|', '/')} | {e.get('seconds', '')} |")
    for key in ("ab_markdown", "bench_markdown"):
        if results.get(key):
            lines += ["", results[key]]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="report folder (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny (CI: proves it starts)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting checks after this (default 450)")
    ap.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {','.join(STAGES)}")
    ap.add_argument("--ab-budget-s", type=float, default=STAGE_S["ab"],
                    help=f"seconds the ab stage may take, diagnostics included (default {STAGE_S['ab']:g})")
    ap.add_argument("--cache-dir", default=None, help="exported models (default: $TMPDIR/pe-gpu-check-models)")
    ap.add_argument("--ort-parts", default=None, help="folder of the carried onnxruntime-gpu parts (GPU.md)")
    ap.add_argument("--wheels", default=None, help="folder of extra wheels to install (lpips, DISTS_pytorch)")
    ap.add_argument("--site", default="/tmp/site", help="where carried wheels are installed (default /tmp/site)")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        ap.error(f"--skip {args.skip!r}: accepted stages {','.join(STAGES)}")
    if (args.ort_parts or args.wheels) and os.environ.get("PE_GPU_CHECK_INSTALLED") != "1":
        install_carried(args.ort_parts, args.wheels, args.site)
        env = {**os.environ, "PE_GPU_CHECK_INSTALLED": "1",
               "PYTHONPATH": os.pathsep.join([args.site, os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    os.makedirs(args.out, exist_ok=True)
    check = Check(args.out, args.budget_s, args.dry_run)
    results = check.results
    results["command"] = "python3 scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["environment"] = environment(args.dry_run)
    print("[environment]", json.dumps(results["environment"], default=str), flush=True)
    import torch

    if not args.dry_run and not (torch.cuda.is_available()
                                 and "CUDAExecutionProvider" in results["environment"]["ort_providers"]):
        print("gpu_check: no CUDA GPU with onnxruntime's CUDA provider here; use --dry-run on a CPU, or "
              "--ort-parts on the GPU machine (docs/gpu.md)", file=sys.stderr)
        results["checks"]["setup"] = {"status": "FAIL", "error": "no CUDA GPU or CUDA provider"}
        _write(check)
        return 1
    # Models outside --out: what is written there comes back from the device machine.
    cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "pe-gpu-check-models")
    models = Models(cache_dir, DRY_LAYERS if args.dry_run else FULL_LAYERS)
    stages = {
        "tests": lambda: check.record("tests", lambda: run_tests(check), need_s=40),
        "parity": lambda: run_parity(check, models),
        "ab": lambda: run_ab_stage(check, models, args.ab_budget_s),
        "layout": lambda: run_layout(check, models),
        "graph": lambda: run_graph(check, models),
    }
    for name, run in stages.items():
        if name not in skip:
            with check.stage(None if args.dry_run else STAGE_S[name]):
                run()
    if "bench" not in skip:
        bench = check.record("bench", lambda: run_bench(check, cache_dir), need_s=30)
        if isinstance(bench, dict) and bench.get("markdown"):
            results["bench_markdown"] = open(bench["markdown"]).read()
    return _write(check)


def _write(check: Check) -> int:
    results = check.results
    results["wall_s"] = round(time.perf_counter() - check.t0, 1)
    with open(os.path.join(check.out, "gpu_check.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    text = to_markdown(results)
    with open(os.path.join(check.out, "gpu_check.md"), "w") as fh:
        fh.write(text)
    print(text, flush=True)
    failed = [n for n, e in results["checks"].items() if e["status"] == "FAIL"]
    print(f"gpu_check: {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; wrote "
          f"{check.out}/gpu_check.json and gpu_check.md in {results['wall_s']} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
