"""Diagnostics of ONNX Runtime sessions for scripts/gpu_check.py (the A/B stage):

- ``placement``: which op types ONNX Runtime placed on the CPU, and Memcpy nodes, from the
  VERBOSE session log (session_state.cc, VerifyEachNodeIsAssignedToAnEp);
- ``layout_summary``: the graph after the NHWC layout transformation, from the dumps that
  the session option ``session.debug_layout_transformation`` writes into the working folder;
- ``kernel_table``: the top kernels by device time, from torch.profiler (CUPTI records every
  kernel in the process, ONNX Runtime's included; on the CPU: torch's CPU ops).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable


@contextlib.contextmanager
def stderr_to(path: str):
    """ONNX Runtime's C++ log goes to fd 2: into a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def placement(path: str, providers: list, debug_layout: bool) -> dict:
    """Open ``path`` with ``providers`` at VERBOSE: nodes per provider, the op types placed on
    the CPU, Memcpy mentions, refusals; with ``debug_layout`` the post-layout-transform graph."""
    import onnxruntime as ort

    path = os.path.abspath(path)
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "ort.log")
        so = ort.SessionOptions()
        so.log_severity_level = 0
        so.log_verbosity_level = 1
        if debug_layout:  # post_layout_transform_step_<n>.onnx, written into the working folder
            so.add_session_config_entry("session.debug_layout_transformation", "1")
        cwd = os.getcwd()
        try:
            os.chdir(d)
            with stderr_to(log):
                sess = ort.InferenceSession(path, so, providers=providers)
            out["providers"] = sess.get_providers()
            del sess
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            out["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        finally:
            os.chdir(cwd)
        lines = open(log, errors="replace").read().splitlines()
        steps = sorted((f for f in os.listdir(d) if f.startswith("post_layout_transform_step_")),
                       key=lambda f: int(re.sub(r"\D", "", f) or 0))
        if steps:
            out["layout"] = layout_summary(os.path.join(d, steps[-1]), len(steps))
        elif debug_layout:
            out["layout"] = "no layout-transformation dump (no NHWC conversion happened)"
    counts: dict[str, dict[str, int]] = {}
    current = None
    for ln in lines:  # " Node(s) placed on [EP]. Number of nodes: N", then "  OpType (name)" lines
        if "VerifyEachNodeIsAssignedToAnEp" not in ln:
            continue
        m = re.search(r"placed on \[(\w+)\]\. Number of nodes: (\d+)", ln)
        if m:
            current = m.group(1)
            counts.setdefault(current, {})["_total"] = int(m.group(2))
            continue
        m = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \(", ln)
        if current and m:
            counts[current][m.group(1)] = counts[current].get(m.group(1), 0) + 1
    out["nodes"] = {ep: ops.get("_total") for ep, ops in counts.items()}
    cpu = counts.get("CPUExecutionProvider", {})
    out["cpu_op_types"] = dict(sorted(((k, v) for k, v in cpu.items() if k != "_total"), key=lambda kv: -kv[1]))
    if cpu.get("_total") and not out["cpu_op_types"]:  # "All nodes placed on [CPUExecutionProvider]"
        out["cpu_op_types"] = {"every node": cpu["_total"]}
    out["memcpy_mentions"] = sum(1 for ln in lines if re.search(r"Memcpy(FromHost|ToHost)", ln))
    out["refusals"] = [ln.strip()[-200:] for ln in lines
                       if re.search(r"cannot use the CUDA Graph|requires W as initializer|Fallback mode", ln)][:5]
    return out


def layout_summary(path: str, n_steps: int) -> dict:
    """What the NHWC layout transformation left: node count, NHWC-domain ops, Transposes."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        key = ("nhwc:" if "nhwc" in node.domain.lower() else "") + node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {"step": n_steps, "nodes": len(m.graph.node), "transposes": ops.get("Transpose", 0),
            "nhwc_ops": {k: v for k, v in ops.items() if k.startswith("nhwc:")}}


def kernel_table(call: Callable[[], Any], sync: Callable[[], None], gpu: bool, top: int = 8) -> dict:
    """The ``top`` kernels by device time per call, over three profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    call()
    sync()
    acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if gpu else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(3):
            call()
        sync()
    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as fh:
            events = json.load(fh).get("traceEvents", [])
    cats = {"kernel", "gpu_memcpy", "gpu_memset"} if gpu else {"cpu_op"}
    agg: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in cats:
            a = agg.setdefault(ev.get("name", "?"), [0.0, 0])
            a[0] += float(ev.get("dur", 0.0))
            a[1] += 1
    rows = [{"ms": round(us / 3 / 1e3, 4), "per_call": n // 3, "name": name[:110]}
            for name, (us, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]]
    return {"total_ms": round(sum(v[0] for v in agg.values()) / 3 / 1e3, 4), "names": len(agg), "top": rows,
            "note": "" if agg or not gpu else "CUPTI recorded nothing: profile with nsys instead"}
