"""Stage ``bench`` of scripts/gpu_check.py: the benchmark's GPU table in a subprocess, stopped
at the budget (the rows measured so far are kept)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from gpu_check_base import DRY_LAYERS, ROOT, Check, Skip

# The compile rows last within each workload: each compiles for tens of seconds, and the
# stage stops at its budget keeping the rows so far.
GPU_VARIANTS = ("torch-eager-fp32", "torch-fp16-cl", "torch-bf16-cl", "torch-fp16-cl-autotune", "ort-cuda-fp32",
                "ort-cuda-tf32", "ort-cuda-fp16", "ort-cuda-iobinding", "ort-cuda-tf32-iobinding", "ort-cuda-graph",
                "ort-cuda-fp16-iobinding", "ort-cuda-fp16-nhwc", "ort-cuda-fp16-graph", "torch-compile-fp16-cl",
                "torch-compile")
# The most asked-for first: the bench stage stops at the budget and keeps the rows so far.
GPU_WORKLOADS = ("distance", "train", "features", "lpips", "dists", "stylize-step")


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
