"""GPU parity tiers and the CUDA fast path. Skipped cleanly without a CUDA GPU.

Tiers, against the PyTorch float32 reference with TF32 off:
strict float32 (TF32 off everywhere) <= 1e-4, TF32 <= 1e-3, float16 <= 1e-2 and finite.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from perceptual_engine import Engine, FeatureSpec, LossConfig, TorchPerceptualLoss, export_onnx
from perceptual_engine.runtime import ProviderOptions
from perceptual_engine.runtime.providers import cuda_gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or cuda_gpu_count()[0] == 0,
                       reason="needs a CUDA GPU"),
]

SPEC = FeatureSpec(weights="random", seed=11)
LOSS = LossConfig(content={"relu2_2": 1.0, "relu4_4": 1.0}, style={"relu1_2": 1.0, "relu3_4": 1.0})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = str(d / f"{dtype}.onnx")
        export_onnx(SPEC, out[dtype], graph="distance", loss=LOSS, dtype=dtype)
    out["style"] = str(d / "style.onnx")
    export_onnx(SPEC, out["style"], graph="style", loss=LossConfig(style={"relu1_2": 1.0, "relu3_4": 1.0}))
    return out


@pytest.fixture(scope="module")
def reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return TorchPerceptualLoss(SPEC, LOSS).cuda()


def _pair(n=3, h=97, w=131, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.rand(n, 3, h, w, device="cuda", generator=g),
            torch.rand(n, 3, h, w, device="cuda", generator=g))


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("tier,dtype,tf32,tol", [("strict", "float32", False, 1e-4),
                                                 ("tf32", "float32", True, 1e-3),
                                                 ("fp16", "float16", False, 1e-2)])
def test_parity_tiers(models, reference, tier, dtype, tf32, tol):
    eng = Engine(models[dtype], device="cuda", options=ProviderOptions(tf32=tf32))
    assert eng.providers[0] == "CUDAExecutionProvider"
    x, y = _pair()
    with torch.no_grad():
        ref = reference(x, y)
    got = eng.distance(x, y)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
        assert _rel(value, ref[name]) <= tol, (tier, name, _rel(value, ref[name]))


def test_numpy_and_torch_cuda_inputs_agree(models):
    eng = Engine(models["float32"], device="cuda", options=ProviderOptions(tf32=False))
    x, y = _pair(2, 64, 80)
    on_gpu = eng.distance(x, y)["total"].cpu().numpy()
    on_host = eng.distance(x.cpu().numpy(), y.cpu().numpy())["total"]
    np.testing.assert_allclose(on_gpu, on_host, rtol=1e-5)


def test_channels_last_and_strided_cuda_tensors(models):
    eng = Engine(models["float32"], device="cuda", options=ProviderOptions(tf32=False))
    x, y = _pair(2, 64, 80)
    expected = eng.distance(x, y)["total"]
    got = eng.distance(x.contiguous(memory_format=torch.channels_last), y.transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(got["total"], expected, rtol=1e-5, atol=0)


def test_cuda_graph_fixed_shape_matches_and_is_thread_safe(models):
    opts = ProviderOptions(tf32=False, cuda_graph=True, fixed_shapes=True)
    eng = Engine(models["float32"], device="cuda", options=opts)
    plain = Engine(models["float32"], device="cuda", options=ProviderOptions(tf32=False))
    pairs = [_pair(2, 64, 64, seed=s) for s in range(8)]
    expected = [plain.distance(x, y)["total"] for x, y in pairs]
    results = [None] * len(pairs)

    def work(i):
        results[i] = eng.distance(*pairs[i])["total"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for a, b in zip(results, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_cuda_graph_engine_gives_fresh_results_for_other_shapes_and_numpy(models):
    # After the capture, other shapes, numpy inputs and a new style target must be
    # computed, not answered by a replay of the captured graph.
    opts = ProviderOptions(tf32=False, cuda_graph=True, fixed_shapes=True)
    eng = Engine(models["float32"], device="cuda", options=opts)
    plain = Engine(models["float32"], device="cuda", options=ProviderOptions(tf32=False))
    x, y = _pair(2, 64, 64, seed=1)
    eng.distance(x, y)  # captured at (2, 64, 64)
    for n, h, w in ((1, 48, 80), (2, 64, 64), (3, 33, 47)):
        x, y = _pair(n, h, w, seed=n + h)
        torch.testing.assert_close(eng.distance(x, y)["total"], plain.distance(x, y)["total"],
                                   rtol=1e-5, atol=1e-12)
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        np.testing.assert_allclose(eng.distance(xn, yn)["total"], plain.distance(xn, yn)["total"],
                                   rtol=1e-5, atol=1e-12)

    style = Engine(models["style"], device="cuda", options=opts)
    x, t1 = _pair(2, 64, 64, seed=5)
    _, t2 = _pair(1, 64, 64, seed=6)
    style.set_style_target(t1[:1])
    first = style.distance(x)["total"]
    style.set_style_target(t2)
    second = style.distance(x)["total"]  # same shape: re-captured with the new target
    ref = TorchPerceptualLoss(SPEC, style.info.loss).cuda()
    ref.set_style_target(t2)
    with torch.no_grad():
        assert _rel(second, ref(x)["total"]) <= 1e-4
    assert not torch.equal(first, second)


def test_cached_style_target_on_gpu(models):
    eng = Engine(models["style"], device="cuda", options=ProviderOptions(tf32=False))
    x, target = _pair(3, 72, 88)
    eng.set_style_target(target[:1])
    ref = TorchPerceptualLoss(SPEC, eng.info.loss).cuda()
    ref.set_style_target(target[:1])
    with torch.no_grad():
        expected = ref(x)
    got = eng.distance(x)
    for name in expected:
        assert _rel(got[name], expected[name]) <= 1e-4, name


# -- float16 on the GPU: gradient and LPIPS tiers (the export's CPU check runs fp16 in fp32) --

GRAD_LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu3_4": 1.0})


@pytest.fixture(scope="module")
def grad_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-grad")
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = str(d / f"grad-{dtype}.onnx")
        export_onnx(SPEC, out[dtype], graph="distance", loss=GRAD_LOSS, dtype=dtype, grad=True)
    return out


@pytest.mark.parametrize("tier,dtype,tf32", [("fp32", "float32", False), ("tf32", "float32", True),
                                             ("fp16", "float16", False)])
def test_gradient_tiers(grad_models, tier, dtype, tf32):
    from perceptual_engine.bench.variants import GRAD_FORGIVE, GRAD_TOLERANCE, TOLERANCE
    from perceptual_engine.export.verify import compare

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = TorchPerceptualLoss(SPEC, GRAD_LOSS).cuda()
    x, y = _pair(2, 97, 131, seed=4)
    xg = x.clone().requires_grad_(True)
    want = ref(xg, y)
    want["total"].sum().backward()
    got = Engine(grad_models[dtype], "cuda", options=ProviderOptions(tf32=tf32)).distance(x, y)
    assert torch.isfinite(got["grad.x"]).all()
    for name in want:
        assert _rel(got[name], want[name]) <= TOLERANCE[tier], (tier, name)
    err = compare(got["grad.x"].double().cpu().numpy(), xg.grad.double().cpu().numpy(), GRAD_FORGIVE[tier])
    assert err.max_rel <= GRAD_TOLERANCE[tier], (tier, err)


def test_lpips_float16_on_the_gpu(lpips_models, rel_err):
    # The float16 LPIPS model on the scaled trunk: activations in the hundreds, float16
    # arithmetic on the GPU (on the CPU its convolutions ran in float32).
    path = lpips_models["fp16"][0]
    rng = np.random.default_rng(5)
    x, y = (rng.uniform(0, 1, (2, 3, 48, 64)).astype(np.float32) for _ in range(2))
    want = Engine(path, "cpu").distance(x, y)  # the same model, its arithmetic in float32
    got = Engine(path, "cuda", options=ProviderOptions(tf32=False)).distance(
        torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
    for name, ref in want.items():
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name].cpu().numpy(), ref) <= 1e-2, name


# -- layouts and streams ----------------------------------------------------------------------


def test_strict_fp32_holds_on_the_nhwc_path(models, reference):
    # TF32 off must hold in the NHWC cuDNN path as well (prefer_nhwc is an option).
    eng = Engine(models["float32"], "cuda", options=ProviderOptions(tf32=False, prefer_nhwc=True))
    x, y = _pair()
    with torch.no_grad():
        ref = reference(x, y)
    got = eng.distance(x, y)
    for name in ref:
        assert _rel(got[name], ref[name]) <= 1e-4, name


def test_iobinding_on_torchs_stream_matches_a_synchronized_run(models):
    torch.zeros(1, device="cuda")  # torch has CUDA up: the Engine can share its stream
    shared = Engine(models["float32"], "cuda", options=ProviderOptions(tf32=False, share_torch_stream=True))
    assert shared.options.user_stream == torch.cuda.current_stream().cuda_stream
    synced = Engine(models["float32"], "cuda", options=ProviderOptions(tf32=False))  # the default
    assert synced.options.user_stream is None  # ORT's own stream: synchronized around each call
    x, y = _pair(2, 64, 80)
    for _ in range(3):  # back to back, no host sync in between on the shared stream
        a = shared.distance(x * 0.5, y)
    b = synced.distance(x * 0.5, y)
    torch.testing.assert_close(a["total"], b["total"], rtol=1e-5, atol=0)


def test_stylize_on_the_gpu_keeps_x_on_the_device(tmp_path):
    from perceptual_engine import stylize

    rng = np.random.default_rng(0)
    content, style = (rng.uniform(0, 1, (3, 40, 56)).astype(np.float32) for _ in range(2))
    spec = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=1)
    loss = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0})
    result = stylize(content, style, spec=spec, loss=loss, steps=5, device="cuda", cache_dir=str(tmp_path))
    assert result.providers[0] == "CUDAExecutionProvider"
    assert result.image.shape == (1, 3, 40, 56) and np.isfinite(result.image).all()
    assert result.final_loss <= result.initial_loss


def test_a_cpu_engine_trains_cuda_tensors(grad_models):
    # ONNX Runtime CPU (or OpenVINO) with x on the GPU: the loss and x's gradient come
    # back on x's device, as autograd needs them.
    from perceptual_engine import EnginePerceptualLoss

    loss = EnginePerceptualLoss(grad_models["float32"], device="cpu")
    x, y = _pair(1, 37, 45)
    x.requires_grad_(True)
    out = loss(x, y)
    assert out["total"].device == x.device
    out["total"].sum().backward()
    assert x.grad is not None and x.grad.device == x.device and torch.isfinite(x.grad).all()


def test_float16_keeps_tensor_cores_with_nhwc_and_fused_bias_in_tier(models, reference):
    # tf32=False is not applied to a float16 model (ORT 1.20+ would drop its tensor cores)
    eng = Engine(models["float16"], "cuda", options=ProviderOptions(tf32=False, prefer_nhwc=True,
                                                                    fuse_conv_bias=True))
    assert eng.options.tf32 and eng.option_notes and not eng.requested_options.tf32
    x, y = _pair()
    with torch.no_grad():
        ref = reference(x, y)
    got = eng.distance(x, y)
    for name, value in got.items():
        assert torch.isfinite(value).all() and _rel(value, ref[name]) <= 1e-2, name


def test_iobinding_recycles_dropped_results_and_keeps_held_ones(models):
    eng = Engine(models["float32"], "cuda", options=ProviderOptions(tf32=False))
    (x1, y1), (x2, y2) = _pair(2, 64, 80, seed=1), _pair(2, 64, 80, seed=2)
    a = eng.distance(x1, y1)
    kept = {k: v.clone() for k, v in a.items()}
    np.testing.assert_allclose(a.host_total, kept["total"].cpu().numpy())  # the check's host copy
    b = eng.distance(x2, y2)
    assert all(torch.equal(a[k], kept[k]) for k in kept)  # held: never overwritten
    ptr = b["total"].data_ptr()
    assert ptr != a["total"].data_ptr()
    want = {k: v.clone() for k, v in b.items()}
    del b
    c = eng.distance(x2, y2)
    assert c["total"].data_ptr() == ptr  # dropped: its buffers are reused
    assert all(_rel(c[k], want[k]) <= 1e-6 for k in want)


def test_static_shape_and_fp16_outputs_on_the_gpu(tmp_path, reference):
    """A static-shape float16 distance model in its tier at its shape (and refusing
    another), and a --fp16-outputs features model returning float16 CUDA tensors that
    match the numpy path."""
    from perceptual_engine import PerceptualError

    static = str(tmp_path / "static16.onnx")
    export_onnx(SPEC, static, graph="distance", loss=LOSS, dtype="float16", static_shape=(3, 97, 131))
    eng = Engine(static, device="cuda")
    x, y = _pair()
    with torch.no_grad():
        ref = reference(x, y)
    got = eng.distance(x, y)
    for name, value in got.items():
        assert _rel(value, ref[name]) <= 1e-2, (name, _rel(value, ref[name]))
    with pytest.raises(PerceptualError, match="static_shape"):
        eng.distance(x[:2], y[:2])
    feats = str(tmp_path / "feat16.onnx")
    export_onnx(SPEC, feats, graph="features", dtype="float16", fp16_outputs=True)
    eng = Engine(feats, device="cuda")
    on_gpu = eng.features(x)
    on_host = eng.features(x.cpu().numpy())
    for name, value in on_gpu.items():
        assert value.dtype == torch.float16 and value.is_cuda
        assert on_host[name].dtype == np.float16
        assert _rel(value.float(), torch.from_numpy(on_host[name].astype(np.float32))) <= 1e-2, name
