"""Stages ``layout`` and ``graph`` of scripts/gpu_check.py: NHWC against NCHW through the
Engine (time and GPU memory); placement, CUDA-graph replay, torch's stream, a capture while
another thread runs."""
from __future__ import annotations

import os
import re
import threading
import time

from gpu_check_base import Check, Models, Skip, rel
from gpu_check_diag import stderr_to


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
