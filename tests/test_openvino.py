"""device="openvino": the same exported files on OpenVINO's CPU plugin, checked against
ONNX Runtime fp32 (the Engine's other backend) within the precision's tier; refusals
for a missing extra, a CPU without BF16, a compile failure and a model out of tier."""
from __future__ import annotations

import ast
import pathlib
import sys

import numpy as np
import onnx
import pytest
import torch

from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx
from perceptual_engine.cli.main import main
from perceptual_engine.errors import ConfigError, DeviceError, PrecisionError
from perceptual_engine.runtime.backends import accuracy
from perceptual_engine.runtime.backends import openvino as ov_backend
from perceptual_engine.runtime.loss import EnginePerceptualLoss

ov = pytest.importorskip("openvino")
HAS_BF16 = "BF16" in ov_backend.capabilities(ov.Core())
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no BF16 (avx512_bf16/AMX)")

# A gradient graph with a square conv (conv1_2: 64 -> 64) whose weights the backward
# also uses: the case where a ConvTranspose input gradient came out wrong on OpenVINO.
GRAD_SPEC = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_1"), weights="random", seed=3)
GRAD_LOSS = LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0}, gram="chw")


def _img(shape, seed):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


@pytest.fixture(scope="session")
def grad_model(model_dir):
    path = model_dir / "ov-grad.onnx"
    export_onnx(GRAD_SPEC, path, graph="distance", loss=GRAD_LOSS, grad=True)
    return str(path)


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- gradients --------------------------------------------------------------------------------


def test_exported_input_gradient_has_no_conv_transpose(grad_model):
    ops = {n.op_type for n in onnx.load(grad_model).graph.node}
    assert "Conv" in ops and "ConvTranspose" not in ops


def test_openvino_f32_gradient_matches_autograd(grad_model):
    # Before the flipped Conv, grad.x on OpenVINO was 124% off (relative L2) on this model.
    x, y = _img((2, 3, 37, 45), 1), _img((2, 3, 37, 45), 2)
    engine = Engine(grad_model, device="openvino", precision="f32")
    assert engine.providers == ["OpenVINO CPU f32"]
    got = engine.distance(x, y)
    from perceptual_engine import TorchPerceptualLoss

    ref = TorchPerceptualLoss(GRAD_SPEC, GRAD_LOSS)
    xt = torch.from_numpy(x).requires_grad_(True)
    total = ref(xt, torch.from_numpy(y))["total"]
    total.sum().backward()
    assert _rel_l2(got["grad.x"], xt.grad.numpy()) < 1e-4
    np.testing.assert_allclose(got["total"], total.detach().numpy(), rtol=1e-4)


def test_gradient_graphs_get_f32_on_auto_and_bf16_only_within_tier(grad_model):
    assert Engine(grad_model, device="openvino").providers == ["OpenVINO CPU f32"]
    if not HAS_BF16:
        return
    try:  # measured 10% (relative L2) on this CPU: refused, with the error in the message
        engine = Engine(grad_model, device="openvino", precision="bf16")
    except PrecisionError as exc:
        assert "grad.x" in str(exc) and exc.errors["grad.x"] > accuracy.TIERS["bf16"].grad
    else:
        assert engine.backend.accuracy["grad.x"] <= accuracy.TIERS["bf16"].grad


def test_engine_loss_on_openvino_gives_autograd_the_gradient(grad_model):
    module = EnginePerceptualLoss(grad_model, device="openvino", precision="f32")
    ref = EnginePerceptualLoss(grad_model, device="cpu")
    x, y = _img((1, 3, 33, 35), 3), _img((1, 3, 33, 35), 4)
    grads = []
    for m in (module, ref):
        xt = torch.from_numpy(x).requires_grad_(True)
        (3.0 * m(xt, torch.from_numpy(y))["total"]).sum().backward()
        grads.append(xt.grad.numpy())
    assert _rel_l2(grads[0], grads[1]) < 1e-4


def test_stylize_on_openvino_matches_the_cpu(target_grad_cache):
    from perceptual_engine.optimize import stylize

    _, _, path = target_grad_cache
    c, s = _img((3, 21, 27), 5), _img((3, 19, 23), 6)
    kw = dict(model=path, steps=3, optimizer="adam")
    on_ov = stylize(c, s, device="openvino", precision="f32", **kw)
    on_cpu = stylize(c, s, device="cpu", **kw)
    assert on_ov.providers == ["OpenVINO CPU f32"]
    np.testing.assert_allclose(on_ov.image, on_cpu.image, atol=1e-4)


# -- forward graphs, precision tiers ------------------------------------------------------------


def test_openvino_f32_features_and_targets_match_onnx_runtime(features_model, style_model):
    x = _img((2, 3, 37, 45), 7)
    got = Engine(features_model[0], device="openvino", precision="f32").features(x)
    want = Engine(features_model[0], device="cpu").features(x)
    for k in want:
        assert accuracy.error("taps", got[k], want[k]) < 1e-4, k
    style = _img((1, 3, 29, 31), 8)
    engines = [Engine(style_model[0], device=d, precision="f32" if d == "openvino" else "auto")
               for d in ("openvino", "cpu")]
    for e in engines:
        e.set_style_target(style)
    a, b = (e.distance(x)["total"] for e in engines)
    np.testing.assert_allclose(a, b, rtol=1e-4)


@needs_bf16
def test_bf16_is_the_auto_choice_on_forward_graphs_and_stays_in_its_tier(distance_model):
    engine = Engine(distance_model[0], device="openvino")
    assert engine.providers == ["OpenVINO CPU bf16"]
    x, y = _img((3, 3, 41, 39), 9), _img((3, 3, 41, 39), 10)
    got, want = engine.distance(x, y), Engine(distance_model[0], device="cpu").distance(x, y)
    assert accuracy.error("total", got["total"], want["total"]) <= accuracy.TIERS["bf16"].total
    assert 0 < engine.backend.accuracy["total"] <= accuracy.TIERS["bf16"].total  # bf16 really ran
    assert "OPTIMIZATION_CAPABILITIES" in engine.describe() and "bf16" in engine.describe()


@needs_bf16
def test_bf16_near_duplicates_are_recomputed_within_the_tier(distance_model):
    """Near-duplicate pairs (noise of 1e-3 and 1e-2 of the range), where bf16 alone was
    10x and 13% off: their totals are recomputed in f32 and within the bf16 tier; an
    unrelated pair in the same call stays bf16."""
    path = distance_model[0]
    engine, cpu = Engine(path, device="openvino", precision="bf16"), Engine(path, device="cpu")
    assert engine.backend.near_total > 0
    rng = np.random.default_rng(27)
    y = rng.uniform(0, 1, (3, 3, 45, 43)).astype(np.float32)
    x = y + rng.uniform(-1, 1, y.shape).astype(np.float32) * np.array([1e-3, 1e-2, 0], np.float32)[:, None, None, None]
    x[2] = rng.uniform(0, 1, y[2].shape)  # unrelated
    x = np.clip(x, 0, 1)
    before = engine.backend.recomputed
    got, want = engine.distance(x, y), cpu.distance(x, y)
    assert engine.backend.recomputed - before == 2
    for name in want:
        assert accuracy.error("total", got[name][:2], want[name][:2]) <= accuracy.TIERS["bf16"].total, name
    assert 0 < abs(got["total"][2] - want["total"][2]) / want["total"][2] <= accuracy.TIERS["bf16"].total


@needs_bf16
def test_auto_runs_f32_where_bf16_fails_the_tier_and_says_why(style_model):
    """A style graph's Grams in bf16 are tens of percent off on unrelated pairs: "auto" must
    not pick what its own check refuses; it runs f32 and says why (``precision_note``)."""
    path = style_model[0]
    with pytest.raises(PrecisionError, match="bf16 is outside its accuracy tier"):
        Engine(path, device="openvino", precision="bf16")
    engine = Engine(path, device="openvino")
    assert engine.providers == ["OpenVINO CPU f32"]
    assert "precision auto runs f32" in engine.precision_note and "style." in engine.precision_note
    style = _img((1, 3, 40, 44), 5)
    x = _img((2, 3, 40, 44), 6)
    cpu = Engine(path, device="cpu")
    for e in (engine, cpu):
        e.set_style_target(style)
    np.testing.assert_allclose(engine.distance(x)["total"], cpu.distance(x)["total"], rtol=1e-4)


def test_a_model_outside_its_tier_is_refused_and_the_check_is_cached(distance_model, monkeypatch):
    path = distance_model[0]
    Engine(path, device="openvino", precision="f32")  # checked once here (or earlier), cached
    calls = []
    real = accuracy.check_inputs
    monkeypatch.setattr(accuracy, "check_inputs", lambda *a: calls.append(1) or real(*a))
    Engine(path, device="openvino", precision="f32")
    assert calls == []  # same file identity: not checked again
    monkeypatch.setitem(accuracy.TIERS, "f32", accuracy.Tier(taps=0.0, total=0.0, terms=0.0, grad=0.0))
    monkeypatch.setattr(accuracy, "_cache", {})
    with pytest.raises(PrecisionError, match=r"OpenVINO f32 is outside its accuracy tier on .* "
                                             r"against ONNX Runtime fp32: .*precision='f32'") as info:
        Engine(path, device="openvino", precision="f32")
    assert calls == [1]
    from perceptual_engine.cli.main import cli_wording

    worded = cli_wording(str(info.value))  # the flag once, not "--precision f32 (--precision f32)"
    assert worded.count("--precision f32") == 1 and "(--precision" not in worded


def test_threads_must_be_positive(distance_model):
    for device in ("openvino", "cpu"):
        for bad in (-1, 0, 1.5):
            with pytest.raises(ConfigError, match=r"threads=.* is not accepted; accepted: None .* or an "
                                                  r"integer >= 1") as info:
                Engine(distance_model[0], device=device, threads=bad)
            assert "\n" not in str(info.value)


def test_the_check_is_redone_for_a_file_rewritten_in_place(distance_model, tmp_path, monkeypatch):
    """Same path, inode, size and mtime (set back), new ctime: checked again."""
    import os
    import shutil
    import time

    path = str(tmp_path / "d.onnx")
    shutil.copyfile(distance_model[0], path)
    Engine(path, device="openvino", precision="f32")
    calls = []
    real = accuracy.check_inputs
    monkeypatch.setattr(accuracy, "check_inputs", lambda *a: calls.append(1) or real(*a))
    st, data = os.stat(path), open(path, "rb").read()
    time.sleep(0.05)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    Engine(path, device="openvino", precision="f32")
    assert calls == [1]


def test_accuracy_errors_are_defined_per_kind():
    want = np.array([[1.0, -2.0], [4.0, 0.5]], np.float32)
    got = want + np.array([[0.1, 0.0], [0.0, 0.0]], np.float32)
    assert accuracy.error("taps", got, want) == pytest.approx(0.1 / 4.0)
    assert accuracy.error("total", np.array([1.1, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.1)
    assert accuracy.error("grad", got, want) == pytest.approx(0.1 / np.sqrt(5.0))


# -- refusals -------------------------------------------------------------------------------


def test_bf16_on_a_cpu_without_it_names_what_the_cpu_supports(distance_model, monkeypatch):
    monkeypatch.setattr(ov_backend, "capabilities", lambda core: ["FP32", "INT8", "BIN"])
    with pytest.raises(ConfigError, match=r"precision='bf16' was requested, but this CPU's OpenVINO "
                                          r"capabilities are FP32, INT8, BIN \(no BF16"):
        Engine(distance_model[0], device="openvino", precision="bf16")
    # auto on such a CPU is f32
    assert Engine(distance_model[0], device="openvino").providers == ["OpenVINO CPU f32"]


def test_bf16_on_an_onnx_runtime_device_is_refused(distance_model):
    with pytest.raises(ConfigError, match=r"precision='bf16' runs on device='openvino' only"):
        Engine(distance_model[0], device="cpu", precision="bf16")
    with pytest.raises(ConfigError, match=r"precision='fp8' is not accepted"):
        Engine(distance_model[0], device="openvino", precision="fp8")


def test_without_the_extra_one_line_with_the_install_command(distance_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(DeviceError, match=r"pip install 'perceptual-engine\[openvino\]'"):
        Engine(distance_model[0], device="openvino")
    a, b = _img((1, 3, 37, 45), 11), _img((1, 3, 37, 45), 12)
    code = main(["distance", "--model", distance_model[0], "--device", "openvino", "--format", "csv",
                 *_pngs(a, b, distance_model[0])])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "--device openvino needs the openvino package" in err
    assert "pip install 'perceptual-engine[openvino]'" in err


def _pngs(a, b, near):
    from perceptual_engine.images import save_image

    folder = pathlib.Path(near).parent / "ov-pngs"
    folder.mkdir(exist_ok=True)
    paths = [str(folder / "a.png"), str(folder / "b.png")]
    for p, arr in zip(paths, (a, b)):
        save_image(p, arr[0])
    return paths


def test_a_compile_failure_is_a_device_error_naming_model_and_op(distance_model, monkeypatch):
    def fail(self, model, device, config):
        raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported operation")

    def query(self, model, device):
        ops = {op.get_friendly_name(): "CPU" for op in model.get_ops()}
        first_matmul = next(op for op in model.get_ops() if op.get_type_name() == "MatMul")
        del ops[first_matmul.get_friendly_name()]
        return ops

    monkeypatch.setattr(ov.Core, "compile_model", fail)
    monkeypatch.setattr(ov.Core, "query_model", query)
    with pytest.raises(DeviceError, match=r"OpenVINO could not compile '.*distance.onnx' for the CPU "
                                          r"\(f32\); unsupported op\(s\): .* \(MatMul\)"):
        Engine(distance_model[0], device="openvino", precision="f32")


# -- layout -----------------------------------------------------------------------------------


def test_targets_and_iobinding_do_not_import_the_engine():
    runtime = pathlib.Path(__file__).parents[1] / "src" / "perceptual_engine" / "runtime"
    for name in ("targets.py", "iobinding.py"):
        tree = ast.parse((runtime / name).read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "engine" not in mods, name


def test_device_auto_says_what_it_chose(distance_model, capsys):
    a, b = _img((1, 3, 37, 45), 13), _img((1, 3, 37, 45), 14)
    code = main(["distance", "--model", distance_model[0], "--format", "csv",
                 *_pngs(a, b, distance_model[0])])
    err = capsys.readouterr().err
    assert code == 0
    assert "--device auto runs CPUExecutionProvider (fp32); OpenVINO is installed: --device openvino" in err


def test_info_says_what_openvino_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    want = "bf16" if HAS_BF16 else "f32"
    assert f"device 'openvino' runs: OpenVINO CPU {want} (precision auto; gradients f32), OpenVINO " in out
    assert "OPTIMIZATION_CAPABILITIES" in out


def test_demo_shows_the_openvino_row_with_its_peer(monkeypatch):
    from perceptual_engine.cli import demo

    rows = demo.demo_variants()
    assert rows[:2] == ("torch-eager-fp32", "ort-cpu")
    assert ("openvino-bf16" in rows and "torch-bf16-autocast" in rows) if HAS_BF16 else "openvino-f32" in rows
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert demo.demo_variants() == ("torch-eager-fp32", "ort-cpu")


def test_ray_actors_take_device_openvino(distance_model):
    from perceptual_engine.distributed.job import plan_resources
    from perceptual_engine.distributed.stages import DistanceActor

    assert plan_resources({"CPU": 8.0, "GPU": 1}, actors=None, num_gpus=None,
                          device="openvino").actor_gpus == 0
    actor = DistanceActor(distance_model[0], device="openvino", precision="f32")
    assert actor.provider == "OpenVINO CPU f32"


def test_bench_openvino_variants_say_why_they_cannot_run(monkeypatch):
    from perceptual_engine.bench import variants as V

    assert {"torch-bf16-autocast", "openvino-f32", "openvino-bf16", "torch-compile"} <= set(V.REGISTRY)
    if HAS_BF16:
        assert "refuses OpenVINO bf16 gradient graphs" in V.openvino_unavailable("bf16", grad=True)
    monkeypatch.setattr(ov_backend, "capabilities", lambda core: ["FP32", "INT8"])
    assert V.openvino_unavailable("bf16", grad=False) == \
        "this CPU has no BF16 (OpenVINO capabilities FP32, INT8)"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert "pip install 'perceptual-engine[openvino]'" in V.openvino_unavailable("f32", grad=False)


def test_bench_cpu_peers_on_the_stylize_step(monkeypatch, target_grad_cache):
    """openvino-f32, torch-bf16-autocast and torch-compile (compile stubbed: its cache
    setting must still be restored by close()) on the gradient workload, end to end."""
    from perceptual_engine.bench import BenchConfig, run

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    result = run(BenchConfig(workloads=("stylize-step",), device="cpu",
                             variants=("torch-eager-fp32", "torch-compile", "torch-bf16-autocast",
                                       "openvino-f32", "openvino-bf16"),
                             cache_dir=target_grad_cache[1], sizes=(27,), batch_sizes=(1,),
                             layers=("relu1_1", "relu1_2"), iters=1, warmup=0, measure_peak=False))
    ov_row = result.row("openvino-f32", "stylize-step", 27, 1)
    assert ov_row.status == "ok" and ov_row.max_rel_err <= 1e-4, (ov_row.status, ov_row.reason)
    assert result.row("torch-compile", "stylize-step", 27, 1).status == "ok"
    assert result.row("torch-bf16-autocast", "stylize-step", 27, 1).precision == "bf16"
    if HAS_BF16:
        assert result.row("openvino-bf16", "stylize-step", 27, 1).status == "skipped"
