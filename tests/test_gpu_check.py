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
    md = (out / "gpu_check.md").read_text()
    assert "| parity.grad.fp32-strict | pass |" in md and "| ort-cpu (fp32) | stylize-step |" in md

    rows = _script("gpu_check_rows")
    assert rows.main([str(out / "gpu_check.json")]) == 2  # a dry run holds no GPU figures
    capsys.readouterr()
    assert rows.main([str(out / "gpu_check.json"), "--allow-dry-run", "--command", "CMD"]) == 0
    section = capsys.readouterr().out
    assert "- Command: `CMD`" in section and "#### Benchmark (GPU table)" in section


def test_gpu_check_refuses_without_a_gpu_unless_dry_run(tmp_path):
    gpu_check = _script("gpu_check")
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "tests,parity,layout,graph,bench"]) == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["checks"]["setup"]["status"] == "FAIL"
