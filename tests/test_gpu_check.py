"""scripts/gpu_check.py starts and reports: its dry run (every stage's CPU part, tiny)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_writes_json_markdown_and_benchmarks_rows(tmp_path, target_grad_cache, capsys):
    gpu_check = _script("gpu_check")
    out = tmp_path / "out"
    # The stylize-step model from the shared cache (the same spec and loss), copied: the
    # models exported here must not land in the shared one (other tests count exports).
    cache = shutil.copytree(target_grad_cache[1], tmp_path / "cache")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        rc = gpu_check.main(["--dry-run", "--out", str(out), "--cache-dir", str(cache)])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    results = json.loads((out / "gpu_check.json").read_text())
    checks = results["checks"]
    assert rc == 0, {k: v for k, v in checks.items() if v["status"] == "FAIL"}
    assert results["dry_run"] is True and results["environment"]["torch"] == torch.__version__
    assert list(checks)[0] == "tests" and checks["tests"]["status"] == "skipped"
    assert checks["parity.fwd.fp32-strict.nchw"]["status"] == "pass"
    grad = checks["parity.grad.fp32-strict"]["value"]
    assert grad["grad_x"] <= grad["grad_limit"] and grad["finite"]
    assert checks["bench"]["status"] == "pass" and checks["bench"]["value"]["rows"] == 4
    assert "parity.dists" in checks  # skipped without perceptual_engine.dists, run with it
    ab = checks["ab"]
    assert ab["status"] == "pass" and list(checks).index("ab") == list(checks).index("parity.dists") + 1
    rows = {(r["workload"], r["variant"]): r for w in ab["value"]["workloads"].values() for r in w["rows"]}
    assert {w for w, _ in rows} == {"features", "distance", "train"}
    for key in [("features", "ort16o nchw B"), ("features", "ort32 nchw B"), ("train", "ort16 nchw B tc-off"),
                ("train", "ort16 nhwc A +bias"), ("train", "ort16 nchw B numpy"), ("train", "engine fixed+graph"),
                ("train", "torch fp16-cl")]:  # every kind of row measured and checked against float32
        assert rows[key].get("median_ms") and not rows[key]["wrong"], (key, rows[key])
    assert rows[("train", "torch fp16-cl")]["err_grad"] <= 5e-2  # AMP, the terms outside autocast
    assert rows[("train", "ort16 nchw B +bias +graph")]["note"].startswith("n/a")
    diag = ab["value"]["workloads"]["train"]["diagnostics"]
    assert "CPUExecutionProvider" in diag["placement ort16 nchw B"]["nodes"]
    assert "layout" in diag["placement ort16 nhwc B +bias"]  # the NHWC graph's summary, or why none
    assert diag["kernels torch fp16-cl"]["top"]
    md = (out / "gpu_check.md").read_text()
    assert "| parity.grad.fp32-strict | pass |" in md and "| ort-cpu (fp32) | stylize-step |" in md
    assert "#### A/B of the CUDA provider options" in md and "| train | ort16 nchw B tc-off |" in md
    assert "- train, placement ort16 nchw B: nodes" in md and "- train, kernels torch fp16-cl:" in md

    rows = _script("gpu_check_rows")
    assert rows.main([str(out / "gpu_check.json")]) == 2  # a dry run holds no GPU figures
    capsys.readouterr()
    assert rows.main([str(out / "gpu_check.json"), "--allow-dry-run", "--command", "CMD"]) == 0
    section = capsys.readouterr().out
    assert "- Command: `CMD`" in section and "#### Benchmark (GPU table)" in section


def test_gpu_bench_command_measures_the_peaks_and_the_honest_baselines():
    gpu_check = _script("gpu_check")
    cmd = gpu_check.bench_command(False, "/c", "/o")
    assert "--no-peak" not in cmd  # TFLOP/s against matrix-product peaks of the same run
    variants = cmd[cmd.index("--variants") + 1].split(",")
    assert {"torch-compile-fp16-cl", "torch-fp16-cl-autotune"} <= set(variants)
    assert "--no-peak" in gpu_check.bench_command(True, "/c", "/o")


def test_gpu_check_refuses_without_a_gpu_unless_dry_run(tmp_path):
    gpu_check = _script("gpu_check")
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "tests,parity,ab,layout,graph,bench"]) == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["checks"]["setup"]["status"] == "FAIL"


def test_stage_budgets_cap_checks_and_leave_the_bench_its_share(tmp_path):
    gpu_check = _script("gpu_check")
    check = gpu_check.Check(str(tmp_path), 450.0, dry_run=False)
    with check.stage(5.0):
        assert check.left() <= 5.0
        entry = check.record("slow", lambda: {"ok": True}, need_s=10)
    assert entry is None and check.results["checks"]["slow"]["status"] == "not run"
    assert check.left() > 400  # outside a stage: the run's budget
    # the default budget holds every capped stage and leaves the bench at least 90 s
    assert 450 - sum(gpu_check.STAGE_S.values()) >= 90
