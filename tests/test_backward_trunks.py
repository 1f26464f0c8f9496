"""backward.py on AlexNet's and SqueezeNet 1.1's trunks (torchvision's ``alexnet().features``
and ``squeezenet1_1().features``, as LPIPS uses them): strided convolutions, 3×3 stride-2
max pools (overlapping windows, floor and ceil mode) and Fire modules, op by op against
autograd, then the whole input gradient against float64 autograd, then exported.

Tolerances (relative error max|a − b| / max|b|):
  op by op, float32 against float32 autograd: 1e-6; max pooling with tied maxima and
  integer gradients: equal, float32 and float16 (every sum is exact);
  op by op, float16 against float64 autograd of the same float16 inputs: 2e-3 (F16_OP_TOL);
  the whole gradient, float32 against float64: 1e-4 (gradref's), 0.1% of elements forgiven
  at max-pool near-ties; float16 networks against float32: 5e-2 on all but 1% (gradref's);
  exported, ONNX Runtime and OpenVINO CPU against float64 autograd: float32 1e-4; float16
  5e-2 on all but 1% (on ONNX Runtime's CPU provider, which computes float16 ops in float32).
"""
from __future__ import annotations

import copy
import functools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from perceptual_engine import backward
from perceptual_engine.reference import Normalize

import gradref

TOL = 1e-4
F16_OP_TOL = 2e-3
F16_TOL = 5e-2


def _autograd_vjp(fn, inp, g):
    inp = inp.clone().requires_grad_()
    fn(inp).backward(g)
    return inp.grad


def _rel(a, b):
    scale = b.abs().max()
    assert scale > 0
    return float((a.double() - b.double()).abs().max().detach() / scale)


# -- convolutions ---------------------------------------------------------------------------
# AlexNet's first conv (11×11, stride 4, padding 2) on sides that leave r = (H + 2p − k) mod s
# = 0, 1, 2, 3 rows to the floor (r < p and r >= p: rows a padded ConvTranspose would drop);
# SqueezeNet's (3×3, stride 2, no padding), odd and even; a stride larger than the kernel
# (gaps); AlexNet's and Fire's stride-1 kernels (5×5, 1×1, 3×3), and a padding beyond k − 1.
CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=11, stride=4, padding=2),
    dict(in_channels=3, out_channels=8, kernel_size=3, stride=2),
    dict(in_channels=4, out_channels=6, kernel_size=2, stride=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 3), padding=(1, 2)),
    dict(in_channels=6, out_channels=5, kernel_size=5, padding=2),
    dict(in_channels=6, out_channels=5, kernel_size=1),
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=3),
]


def _conv_id(kw):
    return f"k{kw['kernel_size']}s{kw.get('stride', 1)}p{kw.get('padding', 0)}"


@pytest.mark.parametrize("kw", CONVS, ids=_conv_id)
def test_conv_vjp_any_stride(kw):
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        conv = torch.nn.Conv2d(**kw)
    for h, w in ((23, 29), (24, 30), (30, 31), (25, 26)):
        x = torch.randn(2, conv.in_channels, h, w, generator=gen)
        g = torch.randn(conv(x).shape, generator=gen)
        got = backward.conv_vjp(g, conv, inp=x)
        assert got.shape == x.shape
        assert _rel(got, _autograd_vjp(conv, x, g)) <= 1e-6
        # float16: weights, x and g rounded to half, against float64 autograd of the same values.
        half = copy.deepcopy(conv).half()
        got16 = backward.conv_vjp(g.half(), half, inp=x.half())
        assert got16.dtype == torch.float16
        want = _autograd_vjp(copy.deepcopy(half).double(), x.half().double(), g.half().double())
        assert _rel(got16, want) <= F16_OP_TOL


def test_conv_vjp_refuses_what_it_does_not_differentiate():
    g = torch.zeros(1, 4, 8, 8)
    for conv in (torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(4, 4, 2, padding="same")):
        with pytest.raises(ValueError, match="conv_vjp"):
            backward.conv_vjp(g, conv, inp=g)
    with pytest.raises(ValueError, match="needs its input"):
        backward.conv_vjp(torch.zeros(1, 4, 4, 4), torch.nn.Conv2d(4, 4, 3, stride=2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        backward.conv_vjp(g, torch.nn.Linear(4, 4))


# -- max pooling ----------------------------------------------------------------------------
# 3×3 stride 2, floor (AlexNet) and ceil mode (SqueezeNet): 23×29 and 30×31 (ceil mode adds
# a window hanging one row over the bottom where the side is even), 12×13, 8×8; 2×2 stride 2
# in ceil mode (the general path, a one-element window on an odd side); a stride larger than
# the kernel (gaps between windows).
POOLS = [(3, 2, False), (3, 2, True), (2, 2, True), (2, 3, False)]


@pytest.mark.parametrize("k, s, ceil", POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_max_pool_vjp_overlapping_windows_with_ties(k, s, ceil, dtype):
    # Values in {0, 1, 2}: most windows hold tied maxima, and most inputs belong to two or
    # four windows. The gradient goes to each window's first maximum in scan order and sums
    # over windows (nn.MaxPool2d's). Integer g: every sum exact, so equal in both dtypes.
    gen = torch.Generator().manual_seed(k * 10 + s + ceil)
    for h, w in ((23, 29), (30, 31), (12, 13), (8, 8)):
        x = torch.randint(0, 3, (2, 3, h, w), generator=gen).to(dtype)
        out = F.max_pool2d(x, k, s, ceil_mode=ceil)
        g = torch.randint(-4, 5, out.shape, generator=gen).to(dtype)
        got = backward.max_pool_vjp(g, x, out, k, s, ceil)
        want = _autograd_vjp(torch.nn.MaxPool2d(k, s, ceil_mode=ceil), x.float(), g.float())
        assert got.dtype == dtype
        assert torch.equal(got.float(), want), (h, w)
    # Distinct values and real gradients, float32: within 1e-6 of autograd.
    x = torch.randn(2, 3, 30, 31, generator=gen)
    out = F.max_pool2d(x, k, s, ceil_mode=ceil)
    g = torch.randn(out.shape, generator=gen)
    assert _rel(backward.max_pool_vjp(g, x, out, k, s, ceil),
                _autograd_vjp(lambda t: F.max_pool2d(t, k, s, ceil_mode=ceil), x, g)) <= 1e-6


def test_max_pool_vjp_every_tie_pattern_of_a_3x3_window():
    # All 512 patterns of 0/1 in one 3×3 window (each a 3×3 image, one window), in both
    # modes: the gradient lands on the first 1 in scan order (the first 0 when all are 0).
    m = torch.arange(512)
    x = ((m[:, None] >> torch.arange(9)) & 1).float().view(512, 1, 3, 3)
    g = torch.ones(512, 1, 1, 1)
    for ceil in (False, True):
        got = backward.max_pool_vjp(g, x, F.max_pool2d(x, 3, 2, ceil_mode=ceil), 3, 2, ceil)
        assert torch.equal(got, _autograd_vjp(torch.nn.MaxPool2d(3, 2, ceil_mode=ceil), x, g))
        assert torch.equal(got.flatten(1).sum(1), torch.ones(512))


# -- Fire -----------------------------------------------------------------------------------
def _fire():
    from torchvision.models.squeezenet import Fire

    with torch.random.fork_rng():
        torch.manual_seed(3)
        return Fire(12, 6, 10, 14).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fire_vjp(dtype):
    # Against autograd through the same module in the same dtype (float16 too: a float64
    # forward would make other ReLU decisions where float16 rounds the squeeze output).
    fire = _fire().to(dtype).requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(2, 12, 23, 29, generator=gen)).to(dtype)
    out = fire(x.clone())
    squeezed = torch.relu(fire.squeeze(x))
    g = torch.randn(out.shape, generator=gen).to(dtype)
    kept = backward.fire_vjp(g, fire, x, out, squeezed)
    assert kept.dtype == dtype
    assert _rel(kept, _autograd_vjp(fire, x, g)) <= (F16_OP_TOL if dtype == torch.float16 else 1e-6)
    assert torch.equal(backward.fire_vjp(g, fire, x, out), kept)  # s recomputed from x


# -- whole trunks ---------------------------------------------------------------------------
# LPIPS' taps: AlexNet's five ReLUs (features[:12]), SqueezeNet's seven slice ends.
TAPS = {
    "alex": {1: "relu1", 4: "relu2", 7: "relu3", 9: "relu4", 11: "relu5"},
    "squeeze": {1: "relu1", 4: "relu2", 7: "relu3", 9: "relu4", 10: "relu5", 11: "relu6", 12: "relu7"},
}
# All taps, or deep ones only: then the ReLU under each max pool is untapped and
# features_and_vjp folds it into the pool's VJP.
LAYER_SETS = {"all": None, "deep": ("relu3", "relu5")}


def _body(arch):
    """A fresh copy of the seeded trunk (built once: AlexNet's classifier is slow to initialize)."""
    return copy.deepcopy(_seeded_body(arch))


@functools.lru_cache(maxsize=None)
def _seeded_body(arch):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        net = torchvision.models.alexnet() if arch == "alex" else torchvision.models.squeezenet1_1()
    body = net.features[:12] if arch == "alex" else net.features
    return body.eval().requires_grad_(False)


def _features(body, taps, layers=None):
    """A stand-in for the trunk's TorchFeatures: torchvision's modules as its body (in-place
    ReLUs and Fire modules included), weights_info keyed as torchvision's state dict."""
    state = {f"features.{k}": v for k, v in body.state_dict().items()}
    taps = {i: n for i, n in taps.items() if layers is None or n in layers}
    return types.SimpleNamespace(body=body, normalize=Normalize("0,1"), _taps=taps,
                                 spec=types.SimpleNamespace(layers=tuple(taps.values())),
                                 weights_info=types.SimpleNamespace(state=state))


def _reference(body, taps, x, seeds):
    """∂(Σ_l <seed_l, F_l>)/∂x in float64 autograd (torchvision's modules, double)."""
    net = copy.deepcopy(body).double()
    norm = Normalize("0,1")
    xd = torch.as_tensor(x).double().requires_grad_()
    h = xd * norm.scale.double() + norm.shift.double()
    feats = []
    for i, mod in enumerate(net):
        h = mod(h)
        if taps.get(i) in seeds:
            feats.append((h.clone(), seeds[taps[i]]))
    torch.autograd.backward([f for f, _ in feats], [s.double() for _, s in feats])
    return xd.grad


def _seeds(feats, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(f.shape, generator=gen) for n, f in feats.items() if layers is None or n in layers}


@pytest.mark.parametrize("arch", ["alex", "squeeze"])
@pytest.mark.parametrize("layers, n, h, w", [("all", 2, 67, 73), ("deep", 1, 80, 91)])
def test_trunk_input_gradient_matches_float64_autograd(arch, layers, n, h, w, make_images):
    # AlexNet's stride-4 conv leaves 0, 2, 1, 0 rows to the floor on sides 67, 73, 80, 91;
    # SqueezeNet's ceil-mode pools add windows over the edge where their input's side is
    # even (67: 33, 16, 8; 73: 36, 18, 9; 80: 39, 19, 9; 91: 45, 22, 11).
    body = _body(arch)
    x = torch.from_numpy(make_images((n, 3, h, w), seed=h))
    feats, vjp = backward.features_and_vjp(_features(body, TAPS[arch]), x)
    seeds = _seeds(feats, LAYER_SETS[layers], seed=w)
    got = vjp(seeds)
    assert got.shape == x.shape and got.dtype == torch.float32
    ref = _reference(body, TAPS[arch], x, seeds)
    gradref.assert_grad_close(got.numpy(), ref.numpy(), TOL, forgive=gradref.MAX_POOL_FORGIVE)


def test_trunk_float16_gradient_within_tolerance(make_images):
    # SqueezeNet in half (every new op kind: strided conv, ceil-mode pools, Fire) against
    # the same network in float32; 1% forgiven for half's ReLU and max decisions.
    full, half = _body("squeeze"), copy.deepcopy(_body("squeeze")).half()
    x = torch.from_numpy(make_images((1, 3, 61, 70), seed=6))
    grads = []
    for body in (full, half):
        feats, vjp = backward.features_and_vjp(_features(body, TAPS["squeeze"]), x)
        grads.append(vjp({k: v.float() for k, v in _seeds(feats, None, seed=7).items()}))
    gradref.assert_grad_close(grads[1].numpy(), grads[0].numpy().astype(np.float64), F16_TOL,
                              forgive=gradref.F16_FORGIVE)


# -- exported -------------------------------------------------------------------------------
class _TrunkGradients(torch.nn.Module):
    """x -> ∂(Σ_l ½‖F_l‖²)/∂x through the front of AlexNet (stride-4 conv, ReLU, floor-mode
    pool) and of SqueezeNet (stride-2 conv, ReLU, ceil-mode pool, Fire), the latter in
    float32 and in float16: every new op kind, in one export (the export is the slow
    part), taps that fuse and that don't."""

    HALF = 2  # the index of the float16 network's output

    def __init__(self):
        super().__init__()
        self.alex = _body("alex")[:3]
        self.squeeze = _body("squeeze")[:4]
        self.squeeze16 = copy.deepcopy(self.squeeze).half()
        self.features = [_features(self.alex, {1: "relu1", 2: "pool1"}),
                         _features(self.squeeze, {2: "pool1", 3: "fire1"}),
                         _features(self.squeeze16, {2: "pool1", 3: "fire1"})]

    def forward(self, x):
        out = []
        for f in self.features:
            feats, vjp = backward.features_and_vjp(f, x)
            out.append(vjp(dict(feats)))
        return tuple(out)


@pytest.mark.slow
def test_trunk_gradients_export_and_run_on_onnx_runtime_and_openvino(make_images, tmp_path):
    import onnx
    import onnxruntime as ort

    from perceptual_engine.export import exporter, shapes

    module = _TrunkGradients().eval()
    proto = exporter._to_onnx(module, (torch.from_numpy(make_images((2, 3, 45, 51), seed=1)),), ("x",),
                              ("grad.alex", "grad.squeeze", "grad.squeeze16"), dynamic=True)
    assert shapes.shape_arithmetic(proto) == []
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    inits = {i.name for i in proto.graph.initializer}
    assert all(n.input[1] in inits for n in convs)  # backward weights are constants
    path = tmp_path / "trunks.onnx"
    onnx.save(proto, path)
    runs = {"onnxruntime": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])}
    try:
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        runs["openvino"] = compiled
    except ImportError:
        pass
    for h, w in ((43, 57), (66, 71)):
        x = make_images((2, 3, h, w), seed=h)
        refs = [_half_norm_reference(f, x) for f in module.features[:2]]
        refs.append(refs[1])  # float16 against the float32 network's float64 gradient
        for name, run in runs.items():
            got = run.run(None, {"x": x}) if name == "onnxruntime" else list(run({"x": x}).values())
            for k, (g, ref) in enumerate(zip(got, refs)):
                tol, forgive = ((F16_TOL, gradref.F16_FORGIVE) if k == module.HALF
                                else (TOL, gradref.MAX_POOL_FORGIVE))
                gradref.assert_grad_close(g, ref.numpy(), tol, forgive=forgive, what=f"{name} output {k}")
    if "openvino" not in runs:
        pytest.skip("openvino is not installed: checked on ONNX Runtime only")


def _half_norm_reference(features, x):
    """∂(Σ_l ½‖F_l‖²)/∂x in float64 autograd: the seeds are the features themselves."""
    net = copy.deepcopy(features.body).double()
    norm = Normalize("0,1")
    xd = torch.as_tensor(x).double().requires_grad_()
    h = xd * norm.scale.double() + norm.shift.double()
    total = 0.0
    for i, mod in enumerate(net):
        h = mod(h)
        if i in features._taps:
            total = total + 0.5 * (h * h).sum()
    total.backward()
    return xd.grad
