"""The benchmark end to end on the CPU: skips with reasons, the WRONG flag, the CLI's files."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from perceptual_engine.bench import BenchConfig, run, variants
from perceptual_engine.bench.cli import add_arguments, main
from perceptual_engine.bench.report import to_json, to_markdown, to_png
from perceptual_engine.errors import ConfigError, DeviceError
from perceptual_engine.runtime.providers import tensorrt_loadable

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips of a CPU-only machine")
GPU_VARIANTS = ("torch-fp16-cl", "torch-bf16-cl", "ort-cuda-fp32", "ort-cuda-tf32", "ort-cuda-fp16",
                "ort-cuda-iobinding", "ort-cuda-graph", "ort-cuda-fp16-iobinding", "ort-cuda-fp16-nhwc",
                "ort-cuda-fp16-graph", "ort-tensorrt", "torch-compile-fp16-cl", "torch-fp16-cl-autotune")
# A shallow network and tiny images: the mechanics, not the numbers, are under test.
TINY = dict(sizes=(32,), batch_sizes=(1,), layers=("relu1_2",), iters=2, warmup=1,
            measure_peak=False)


def test_config_defaults_follow_quick_and_explicit_values_win():
    quick = BenchConfig(quick=True)
    assert (quick.workloads, quick.sizes, quick.batch_sizes) == (("features", "distance"), (224,), (1, 4))
    assert quick.variants == tuple(variants.REGISTRY)
    full = BenchConfig()
    assert (full.sizes, full.batch_sizes, full.workloads) == (
        (224, 512), (1, 8, 32), ("features", "distance", "style", "train", "stylize-step"))
    mine = BenchConfig(workloads=("distance",), sizes=(224,), batch_sizes=(4,), quick=True)
    assert (mine.workloads, mine.batch_sizes) == (("distance",), (4,))


@pytest.mark.parametrize("kw, match", [
    (dict(variants=("ort-gpu",)), "unknown variant"),
    (dict(workloads=("segmentation",)), "workload 'segmentation'"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(sizes=(0,)), "sizes"),
    (dict(iters=0), "iters"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**kw)


@no_cuda
def test_variants_that_cannot_run_on_a_cpu_machine_are_skipped_with_reasons():
    result = run(BenchConfig(workloads=("features",), variants=("torch-eager-fp32", "torch-compile")
                             + GPU_VARIANTS, quick=True, **TINY))
    skipped = result.skipped
    assert set(skipped) == set(GPU_VARIANTS) | {"torch-compile"}
    for name in GPU_VARIANTS:
        assert skipped[name].startswith("no CUDA GPU: "), skipped[name]
    assert "--quick" in skipped["torch-compile"]
    if not tensorrt_loadable()[0]:
        assert "TensorRT not loadable" in skipped["ort-tensorrt"]
    row = result.row("ort-cuda-fp32", "features", 32, 1)
    assert (row.status, row.stats, row.speedup) == ("skipped", None, None)
    assert result.row("torch-eager-fp32", "features", 32, 1).status == "ok"
    md = to_markdown(result)
    assert "### Skipped" in md and "| ort-cuda-graph | no CUDA GPU" in md
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        run(BenchConfig(device="cuda", workloads=("features",), **TINY))


@dataclass(frozen=True)
class _Perturbed(variants.TorchVariant):
    """The eager reference with its outputs scaled by 1 + 1e-3: over fp32's 1e-4."""

    def runner(self, ctx, case):
        inner = variants.TorchRunner(ctx, case, "fp32")
        call = inner.call
        inner.call = lambda i: {k: v * 1.001 for k, v in call(i).items()}  # type: ignore[method-assign]
        return inner


def test_a_variant_off_by_more_than_its_tolerance_is_wrong_and_not_ranked(monkeypatch):
    monkeypatch.setitem(variants.REGISTRY, "torch-perturbed",
                        _Perturbed("torch-perturbed", "perturbed on purpose", False))
    result = run(BenchConfig(workloads=("features",), variants=("torch-eager-fp32", "torch-perturbed"),
                             device="cpu", **TINY))
    good = result.row("torch-eager-fp32", "features", 32, 1)
    bad = result.row("torch-perturbed", "features", 32, 1)
    assert (good.status, good.speedup, good.max_rel_err) == ("ok", 1.0, 0.0)
    assert bad.status == "WRONG" and bad.speedup is None
    assert bad.max_rel_err == pytest.approx(1e-3, rel=1e-2)
    assert bad.stats is not None  # still timed and shown, only not ranked
    line = next(ln for ln in to_markdown(result).splitlines() if ln.startswith("| torch-perturbed"))
    assert "**WRONG** (> 0.0001)" in line and "| — |" in line


def test_cli_exits_1_on_a_wrong_result_and_still_writes_the_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(variants.REGISTRY, "torch-perturbed",
                        _Perturbed("torch-perturbed", "perturbed on purpose", False))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args(["--sizes", "32", "--batch-sizes", "1", "--layers", "relu1_2",
                              "--iters", "1", "--warmup", "0", "--workloads", "features",
                              "--device", "cpu", "--no-peak", "--quiet", "--out", str(out),
                              "--variants", "torch-eager-fp32,torch-perturbed"])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 result(s) WRONG" in err and "torch-perturbed" in err
    assert "**WRONG**" in (out / "bench.md").read_text()
    assert json.loads((out / "bench.json").read_text())["rows"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes, no leftovers


def test_cli_main_writes_markdown_json_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args([
        "--sizes", "32", "--batch-sizes", "1", "--layers", "relu1_2,relu2_2", "--iters", "2",
        "--warmup", "1", "--workloads", "features,distance,style", "--device", "cpu",
        "--variants", "torch-eager-fp32,ort-cpu,ort-cuda-graph", "--out", str(out), "--quiet",
    ])
    assert main(args) == 0
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| variant | workload | size | batch | p50 ms |" in md
    assert "--variants torch-eager-fp32,ort-cpu,ort-cuda-graph" in md  # the command, stated
    rows = {(r["variant"], r["workload"]): r for r in data["rows"]}
    for workload in ("features", "distance", "style"):
        ort = rows[("ort-cpu", workload)]
        assert ort["status"] == "ok", ort["reason"]
        assert ort["max_rel_err"] <= 1e-4
        assert len(ort["stats"]["samples_ms"]) == 2 and ort["speedup"] > 0
        assert ort["cold_start_s"] > 0 and ort["flops_per_call"] > 0
    assert rows[("torch-eager-fp32", "distance")]["stats"]["items_per_call"] == 1
    assert "pairs/s" in md
    env = data["environment"]
    for key in ("device_name", "cpu_model", "cpu_cores", "versions", "ort_providers", "tf32",
                "weights", "command"):
        assert key in env
    assert env["weights"]["source"].startswith("random")
    assert set(env["versions"]) >= {"torch", "torchvision", "onnx", "onnxruntime"}
    assert "cpu-fp32" in data["peaks"] and rows[("ort-cpu", "features")]["peak_fraction"] > 0
    assert "ort-cuda-graph" in data["skipped"]
    assert "wrote" in capsys.readouterr().err


def test_png_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    result = run(BenchConfig(workloads=("features",), variants=("torch-eager-fp32",), device="cpu",
                             **TINY))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert to_png(result, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    assert json.dumps(to_json(result))  # JSON-serializable as returned


def test_module_entry_point_has_help():
    proc = subprocess.run([sys.executable, "-m", "perceptual_engine.bench", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "ort-cuda-graph" in proc.stdout


def test_cli_configuration_error_is_exit_2_in_one_line(tmp_path, capsys):
    from perceptual_engine.cli import main as cli_main

    assert cli_main(["bench", "--variants", "nope", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant(s) ['nope']; accepted: torch-eager-fp32" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_sizes_below_the_deepest_layer_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"sizes \[4\] are below 8 pixels, the smallest side relu4_4"):
        BenchConfig(sizes=(4, 32))


@dataclass(frozen=True)
class _Interrupted(variants.TorchVariant):
    """Ctrl-C arrives while this variant is being timed."""

    def runner(self, ctx, case):
        inner = variants.TorchRunner(ctx, case, "fp32")
        call = inner.call

        def interrupt(i):
            if i > 0:
                raise KeyboardInterrupt
            return call(i)

        inner.call = interrupt  # type: ignore[method-assign]
        return inner


def test_ctrl_c_keeps_the_rows_measured_so_far(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(variants.REGISTRY, "torch-interrupted",
                        _Interrupted("torch-interrupted", "interrupted on purpose", False))
    result = run(BenchConfig(workloads=("features",), variants=("torch-eager-fp32", "torch-interrupted"),
                             device="cpu", **{**TINY, "batch_sizes": (1, 2)}))
    assert result.interrupted
    assert [(r.variant, r.batch, r.status) for r in result.rows] == [("torch-eager-fp32", 1, "ok")]
    assert to_markdown(result).count("Interrupted (Ctrl-C)") == 1
    assert to_json(result)["interrupted"] is True


def test_a_reference_that_fails_fails_its_rows_not_the_run(monkeypatch):
    import perceptual_engine.bench as bench

    def oom(ctx, case):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "_reference", oom)
    result = run(BenchConfig(workloads=("features",), variants=("ort-cpu",), device="cpu",
                             **{**TINY, "batch_sizes": (1, 2)}))
    assert [(r.batch, r.status) for r in result.rows] == [(1, "failed"), (2, "failed")]
    assert "CUDA out of memory" in result.rows[0].reason


def test_cache_dir_reuses_verified_models_across_runs(tmp_path):
    cfg = BenchConfig(workloads=("features",), variants=("ort-cpu",), device="cpu",
                      cache_dir=str(tmp_path / "models"), **TINY)
    first, second = run(cfg), run(cfg)
    assert [e["cached"] for e in first.exports] == [False]
    assert [e["cached"] for e in second.exports] == [True]
    assert first.exports[0]["path"] == second.exports[0]["path"]
    assert second.rows[0].status == "ok"


def test_gradient_workloads_have_their_own_sizes_unless_the_config_names_them():
    full, quick = BenchConfig(), BenchConfig(quick=True)
    assert full.points("train") == ((224,), (1, 8, 32))
    assert full.points("stylize-step") == ((512,), (1,))
    assert full.points("distance") == ((224, 512), (1, 8, 32))
    assert quick.points("train") == quick.points("stylize-step") == ((64,), (1,))
    mine = BenchConfig(sizes=(32,), batch_sizes=(2, 4))
    assert mine.points("train") == ((32,), (2, 4))
    assert mine.points("stylize-step") == ((32,), (1,))  # one image is optimized


@dataclass(frozen=True)
class _GradOff(variants.TorchVariant):
    """The reference with only its gradient scaled by 1 + 1e-3: the terms are right."""

    def runner(self, ctx, case):
        inner = variants.TorchRunner(ctx, case, "nograd-y" if case.workload.name == "train" else "fp32")
        call = inner.call
        inner.call = lambda i: {k: v * (1.001 if k == "grad.x" else 1.0)  # type: ignore[method-assign]
                                for k, v in call(i).items()}
        return inner


def test_train_and_stylize_step_run_end_to_end_and_check_the_gradient(monkeypatch, target_grad_cache):
    monkeypatch.setitem(variants.REGISTRY, "torch-grad-off",
                        _GradOff("torch-grad-off", "gradient off on purpose", False))
    # The stylize-step model is the shared one (same spec and loss); train exports its own.
    result = run(BenchConfig(workloads=("train", "stylize-step"), device="cpu",
                             variants=("torch-eager-fp32", "torch-nograd-y", "ort-cpu", "torch-grad-off"),
                             cache_dir=target_grad_cache[1],
                             **{**TINY, "sizes": (27,), "batch_sizes": (2,), "layers": ("relu1_1", "relu1_2")}))
    for workload, unit in (("train", "pairs/s"), ("stylize-step", "images/s")):
        batch = 2 if workload == "train" else 1
        ort = result.row("ort-cpu", workload, 27, batch)
        assert ort.status == "ok" and ort.max_rel_err <= 1e-4, (ort.status, ort.reason, ort.max_rel_err)
        assert ort.unit == unit and ort.speedup > 0 and ort.stats.items_per_call == batch
        bad = result.row("torch-grad-off", workload, 27, batch)
        assert bad.status == "WRONG" and bad.speedup is None
        # grad.x was compared: off by 1e-3 everywhere, so even with the largest 1% of
        # element errors left out it is far over its fp32 limit (1e-4)
        assert 5e-4 < bad.grad_rel_err <= 1.01e-3
        assert bad.max_rel_err <= 1e-4  # the terms are right
    nograd = result.row("torch-nograd-y", "train", 27, 2)
    assert nograd.status == "ok" and nograd.max_rel_err <= 1e-4
    assert result.row("torch-nograd-y", "stylize-step", 27, 1).status == "skipped"
    assert {(e["graph"], e["cached"]) for e in result.exports} == {("distance", False), ("target", True)}


# -- honest GPU baselines, checked on the CPU -----------------------------------------------------


def _train_case(size=37, batch=2):
    from perceptual_engine import FeatureSpec
    from perceptual_engine.bench import workloads as W

    spec = FeatureSpec(layers=("relu1_2", "relu2_1"), weights="random", seed=0)
    return W.make_case(W.get("train"), spec, size, batch, n_sets=1, seed=0)


def test_amp_train_rows_compute_the_loss_terms_in_float32_outside_autocast(monkeypatch):
    from perceptual_engine import losses
    from perceptual_engine.bench import training
    from perceptual_engine.bench.workloads import torch_model
    from perceptual_engine.weights import load_weights

    case = _train_case()
    model = torch_model(case, load_weights(case.spec))
    feeds = {k: torch.from_numpy(v) for k, v in case.sets[0].items()}
    seen = []
    real = losses.distance_terms

    def spy(fx, fy, loss, **kw):  # what the loss terms (the Grams) are computed from
        seen.append((torch.is_autocast_enabled("cpu"), {v.dtype for v in fx.values()}))
        return real(fx, fy, loss, **kw)

    monkeypatch.setattr(training.losses, "distance_terms", spy)
    want = training.value_and_grad(training.terms_fn(case, model, snippet=False), feeds)
    got = training.value_and_grad(training.terms_fn(case, model, snippet=False, amp=torch.bfloat16),
                                  feeds, amp=torch.bfloat16)
    assert seen[1] == (False, {torch.float32})  # not under autocast, float32 features
    for k in want:
        if k != "grad.x":  # bf16 convolutions, float32 Grams: the terms within the fp16 tier
            assert got[k].dtype == torch.float32
            assert float((got[k] - want[k]).abs().max() / want[k].abs().max()) <= variants.TOLERANCE["fp16"], k


def test_autotune_row_turns_cudnn_benchmark_on_for_its_calls_only(monkeypatch):
    from perceptual_engine.bench.variant_base import Context
    from perceptual_engine.weights import load_weights

    case = _train_case(size=32, batch=1)
    ctx = Context("cpu", True, "", (), lambda c, d: "", load_weights, "")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runner = variants.REGISTRY["torch-fp16-cl-autotune"].runner(ctx, case)
    assert runner.precision == "fp16" and not runner.compiled
    runner.build()
    assert torch.backends.cudnn.benchmark is True
    out = runner.call(0)
    assert out["total"].dtype == torch.float32 and set(out) >= {"total", "grad.x"}
    runner.close()
    assert torch.backends.cudnn.benchmark is False
    compiled = variants.REGISTRY["torch-compile-fp16-cl"].runner(ctx, case)
    assert compiled.compiled and compiled.dtype == torch.float16 and compiled.precision == "fp16"


def test_numpy_fed_gpu_rows_say_host_io_and_float16_rows_keep_tensor_cores():
    from perceptual_engine.bench import Row
    from perceptual_engine.bench.report import label

    reg = variants.REGISTRY
    assert {n for n, v in reg.items() if getattr(v, "host_io", False)} == {
        "ort-cuda-fp32", "ort-cuda-tf32", "ort-cuda-fp16", "ort-tensorrt"}
    assert label(Row("ort-cuda-fp16", "features", 224, 8, "ok", precision="fp16", host_io=True)) == (
        "ort-cuda-fp16 (fp16, host I/O)")
    from perceptual_engine.bench import harness
    from perceptual_engine.bench.report import _cells

    row = Row("ort-cuda-fp16", "features", 224, 8, "ok", precision="fp16", tflops=52.6, peak_fraction=0.0532,
              stats=harness.summarize([5.37], items_per_call=8))
    assert _cells(row)[10] == "5.3% (52.6 TFLOP/s)"  # achieved TFLOP/s against the run's peak
    # use_tf32=0 would drop the float16 convolutions' tensor cores (ORT 1.20+)
    assert all(v.use_tf32 for v in reg.values() if getattr(v, "dtype", "") == "float16")
    assert not reg["ort-cuda-fp32"].use_tf32
