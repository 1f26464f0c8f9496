"""LPIPS against the lpips package itself: reference, ONNX float32/float16, gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import Engine
from perceptual_engine import lpips as L
from perceptual_engine.lpips import TorchLPIPS
from perceptual_engine.reference import TorchFeatures

pytest.importorskip("lpips")


def pkg_outputs(model, x: torch.Tensor, y: torch.Tensor, *, normalize: bool,
                spatial: bool = False) -> dict[str, np.ndarray]:
    """The lpips package's own numbers under our output names."""
    with torch.no_grad():
        total, per = model(x, y, retPerLayer=True, normalize=normalize)
        out = {f"lpips.{n}": p.flatten().numpy() for n, p in zip(L.LAYERS, per)}
        out["total"] = total.flatten().numpy()
        if spatial:
            model.spatial = True
            try:
                out["spatial"] = model(x, y, normalize=normalize).numpy()
            finally:
                model.spatial = False
    return out


def images(shape, seed, lo):
    g = torch.Generator().manual_seed(seed)
    return lo + (1.0 - lo) * torch.rand(shape, generator=g)


# -- the PyTorch reference -------------------------------------------------------------


@pytest.mark.parametrize("input_range", ["-1,1", "0,1"])
@pytest.mark.parametrize("shape", [(1, 3, 37, 45), (3, 3, 33, 51)])
def test_reference_matches_lpips_package(lpips_pkg, rel_err, input_range, shape):
    lo = -1.0 if input_range == "-1,1" else 0.0
    x, y = images(shape, 1, lo), images(shape, 2, lo)
    ours = TorchLPIPS(L.default_spec(lpips_pkg["weights"], input_range=input_range), spatial=True)
    with torch.no_grad():
        got = {k: v.numpy() for k, v in ours(x, y).items()}
    want = pkg_outputs(lpips_pkg["model"], x, y, normalize=lo == 0.0, spatial=True)
    assert list(got) == list(want)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-5, name
    assert (want["total"] > 0).all()


def test_loader_reads_the_package_file():
    import importlib.util
    import os

    lin = L.load_linear_weights()
    folder = importlib.util.find_spec("lpips").submodule_search_locations[0]
    assert lin.source == os.path.abspath(os.path.join(folder, "weights", "v0.1", "vgg.pth"))
    raw = torch.load(lin.source, map_location="cpu", weights_only=True)
    for i, w in enumerate(lin.weights):
        assert torch.equal(w, raw[f"lin{i}.model.1.weight"])
    assert len(lin.sha256) == 64


# -- ONNX ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 35, 49), (3, 3, 41, 33)])
def test_onnx_float32_matches_lpips_package(lpips_models, lpips_pkg, rel_err, shape):
    path, spec, result = lpips_models["fp32"]
    assert result.outputs == L.output_names(spatial=True) + ("grad.x",)
    assert result.max_rel_error <= 1e-4
    engine = Engine(path, "cpu")
    assert engine.info.lpips["weights_sha256"] == L.load_linear_weights().sha256
    x, y = images(shape, 3, -1.0), images(shape, 4, -1.0)
    got = engine.distance(x.numpy(), y.numpy())
    grad = got.pop("grad.x")
    want = pkg_outputs(lpips_pkg["model"], x, y, normalize=False, spatial=True)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape
        assert rel_err(got[name], want[name]) <= 1e-4, name
    # grad.x against torch autograd of the lpips package
    xa = x.clone().requires_grad_()
    lpips_pkg["model"](xa, y).sum().backward()
    assert np.isfinite(xa.grad.numpy()).all()
    assert rel_err(grad, xa.grad.numpy()) <= 1e-4


def test_engine_perceptual_loss_on_lpips(lpips_models, lpips_pkg, rel_err):
    """EnginePerceptualLoss on an LPIPS grad model: weighted totals backpropagate to x as
    lpips' own autograd does."""
    from perceptual_engine.runtime.loss import EnginePerceptualLoss

    crit = EnginePerceptualLoss(lpips_models["fp32"][0], "cpu")
    x, y = images((2, 3, 33, 37), 14, -1.0), images((2, 3, 33, 37), 15, -1.0)
    w = torch.tensor([0.5, 2.0])
    xe = x.clone().requires_grad_()
    out = crit(xe, y)
    (w * out["total"]).sum().backward()
    xa = x.clone().requires_grad_()
    (w * lpips_pkg["model"](xa, y).flatten()).sum().backward()
    assert rel_err(out["total"].detach().numpy(), lpips_pkg["model"](x, y).flatten().detach().numpy()) <= 1e-4
    assert rel_err(xe.grad.numpy(), xa.grad.numpy()) <= 1e-4


def _eps_adds(path: str) -> list[float]:
    """The constants added to a Sqrt's output, for each Sqrt of the graph (None: no Add)."""
    import onnx

    model = onnx.load(path)
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    out = []
    for node in model.graph.node:
        if node.op_type == "Sqrt":
            adds = [consts.get(n.input[1]) for n in users.get(node.output[0], []) if n.op_type == "Add"]
            out.append(float(adds[0]) if adds and adds[0] is not None else None)
    return out


@pytest.mark.parametrize("key, norms", [("fp32", 10), ("fp16", 5)])
def test_onnx_keeps_the_norm_epsilon(lpips_models, key, norms):
    """Every channel norm of the exported head is followed by + 1e-10: torch's default ONNX
    optimizer deleted that Add as "x + 0". The gradient graph (fp32 here) normalizes x's
    and y's features apart (10 norms); the forward graph once on the joined batch (5)."""
    got = _eps_adds(lpips_models[key][0])
    assert len(got) == norms and all(v == np.float32(L.EPS) for v in got), got


def test_onnx_dead_tap_is_finite(lpips_models, lpips_pkg, rel_err):
    """The exported float32 model with conv5_3's bias at -1e3: every relu5_3 feature vector
    is zero, where n(f) = 0 / (0 + 1e-10) = 0. Outputs and grad.x are finite and equal
    the lpips package's (the Add-less graph gave 0/0 = NaN)."""
    import copy

    import onnx
    import onnxruntime as ort

    model = onnx.load(lpips_models["fp32"][0])
    # The random trunk's biases are 0, which the optimizer drops: give conv5_3 (x's and
    # y's) one, as the package's conv5_3 below.
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full((512,), -1e3, np.float32), "dead"))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "features.body.28.weight"]
    assert len(convs) == 2
    for conv in convs:
        del conv.input[2:]
        conv.input.append("dead")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = images((1, 3, 33, 35), 12, -1.0), images((1, 3, 33, 35), 13, -1.0)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"x": x.numpy(), "y": y.numpy()})))

    pkg = copy.deepcopy(lpips_pkg["model"])
    with torch.no_grad():
        getattr(pkg.net.slice5, "28").bias.fill_(-1e3)
    want = pkg_outputs(pkg, x, y, normalize=False, spatial=True)
    xa = x.clone().requires_grad_()
    pkg(xa, y).sum().backward()
    want["grad.x"] = xa.grad.numpy()
    assert want["lpips.relu5_3"][0] == 0 and want["total"][0] > 0  # n(0) - n(0) at relu5_3
    for name in want:
        assert np.isfinite(got[name]).all(), name
        if name == "lpips.relu5_3":  # exactly 0 both sides, which rel_err refuses to compare
            assert not got[name].any(), got[name]
        else:
            assert rel_err(got[name], want[name]) <= 1e-4, name


def test_onnx_float16_large_activations(lpips_models, lpips_pkg, rel_err):
    """float16 network, float32 head: finite and within 2e-2 of the lpips package (float32)
    where the channel sum of squares would overflow float16."""
    path, spec, result = lpips_models["fp16"]
    x, y = images((2, 3, 37, 43), 5, 0.0), images((2, 3, 37, 43), 6, 0.0)
    with torch.no_grad():
        feats = TorchFeatures(spec).extract(x)
    sumsq = max(float((f * f).sum(dim=1).max()) for f in feats.values())
    assert max(float(f.max()) for f in feats.values()) > 100  # activations in the hundreds
    assert sumsq > 65504  # the head would overflow in float16
    got = Engine(path, "cpu").distance(x.numpy(), y.numpy())
    want = pkg_outputs(lpips_pkg["scaled"], x, y, normalize=True)
    for name in want:
        assert np.isfinite(got[name]).all(), name
        assert rel_err(got[name], want[name]) <= 2e-2, name



# -- gradient --------------------------------------------------------------------------


def _random_lin(seed: int) -> L.LinearWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    return L.check_linear_weights(
        {f"lin{i}.model.1.weight": torch.rand(s, generator=g) for i, s in enumerate(shapes)}, "test")


def test_head_vjp_matches_autograd():
    g = torch.Generator().manual_seed(7)
    lin = _random_lin(8)
    sizes = [(64, 9, 11), (128, 5, 7), (256, 3, 5), (512, 3, 3), (512, 1, 3)]
    fx = {n: torch.randn(2, *s, generator=g).double().requires_grad_() for n, s in zip(L.LAYERS, sizes)}
    fy = {n: torch.randn(2, *s, generator=g).double() for n, s in zip(L.LAYERS, sizes)}
    seed = torch.tensor([0.7, -1.3])
    lin64 = L.LinearWeights(tuple(w.double() for w in lin.weights), "", "")
    total = L.head(fx, fy, lin64)["total"]
    want = torch.autograd.grad((total * seed).sum(), list(fx.values()))
    # head_vjp computes in float32, as the graph does
    got = L.head_vjp({k: v.detach().float() for k, v in fx.items()}, fy, lin, seed)
    for name, w in zip(L.LAYERS, want):
        err = (got[name].double() - w).abs().max() / w.abs().max()
        assert err < 1e-5, (name, float(err))


def test_head_vjp_finite_where_features_are_zero():
    g = torch.Generator().manual_seed(9)
    lin = _random_lin(10)
    sizes = [(64, 5, 7), (128, 3, 3), (256, 3, 3), (512, 1, 3), (512, 1, 1)]
    fx = {n: torch.randn(1, *s, generator=g).relu() for n, s in zip(L.LAYERS, sizes)}
    fy = {n: torch.randn(1, *s, generator=g).relu() for n, s in zip(L.LAYERS, sizes)}
    fx["relu1_2"][:, :, 2, 3] = 0.0  # a dead pixel: every channel zero
    leaf = {k: v.clone().requires_grad_() for k, v in fx.items()}
    (auto,) = torch.autograd.grad(L.head(leaf, fy, lin)["total"].sum(), [leaf["relu1_2"]])
    assert torch.isnan(auto[0, :, 2, 3]).all()  # what lpips' own autograd gives there
    got = L.head_vjp(fx, fy, lin, torch.ones(1))["relu1_2"]
    assert torch.isfinite(got).all()
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[:, :, 2, 3] = False
    assert torch.allclose(got[mask], auto[mask], rtol=1e-5, atol=1e-7)


def _grad_through_engine_head(spec, lin, x, y):
    """dTotal/dx: the trunk by autograd, the head by head_vjp."""
    feats = TorchFeatures(spec)
    x = x.clone().requires_grad_()
    fx = feats.extract(x)
    with torch.no_grad():
        fy = feats.extract(y)
    gfx = L.head_vjp({k: v.detach() for k, v in fx.items()}, fy, lin, torch.ones(x.shape[0]))
    torch.autograd.backward([fx[n] for n in L.LAYERS], [gfx[n] for n in L.LAYERS])
    return x.grad


def test_gradient_matches_lpips_package_autograd(lpips_pkg):
    spec = L.default_spec(lpips_pkg["weights"], input_range="-1,1")
    lin = L.load_linear_weights()
    x, y = images((2, 3, 35, 39), 11, -1.0), images((2, 3, 35, 39), 12, -1.0)
    got = _grad_through_engine_head(spec, lin, x, y)
    xa = x.clone().requires_grad_()
    lpips_pkg["model"](xa, y).sum().backward()
    want = xa.grad
    assert torch.isfinite(want).all()
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, err


def test_gradient_finite_on_constant_image(lpips_pkg, tmp_path):
    """A constant image on a trunk whose relu5_3 is dead (conv5_3 bias -1e3): every
    feature vector there is zero. Autograd of the head gives NaN at that tap (torch's
    ReLU backward selects, so lpips' gradient w.r.t. x is still finite; a ReLU backward
    that multiplies, g · (out > 0), would carry the NaN). head_vjp is finite there, and
    the gradient w.r.t. x equals lpips' autograd."""
    import copy

    state = torch.load(lpips_pkg["weights"], map_location="cpu", weights_only=True)
    state["features.28.bias"] = torch.full_like(state["features.28.bias"], -1e3)
    path = tmp_path / "dead.pth"
    torch.save(state, path)
    spec, lin = L.default_spec(str(path), input_range="-1,1"), L.load_linear_weights()
    x = torch.full((1, 3, 33, 35), 0.25)  # a constant grey image
    y = images((1, 3, 33, 35), 13, -1.0)

    feats = TorchFeatures(spec)
    with torch.no_grad():
        fx, fy = feats.extract(x), feats.extract(y)
    assert float(fx["relu5_3"].abs().max()) == 0.0
    leaf = {k: v.clone().requires_grad_() for k, v in fx.items()}
    (auto,) = torch.autograd.grad(L.head(leaf, fy, lin)["total"].sum(), [leaf["relu5_3"]])
    assert torch.isnan(auto).all()
    assert torch.isfinite(L.head_vjp(fx, fy, lin, torch.ones(1))["relu5_3"]).all()

    got = _grad_through_engine_head(spec, lin, x, y)
    pkg = copy.deepcopy(lpips_pkg["model"])
    with torch.no_grad():
        getattr(pkg.net.slice5, "28").bias.fill_(-1e3)
    xa = x.clone().requires_grad_()
    pkg(xa, y).sum().backward()
    assert torch.isfinite(got).all() and got.abs().max() > 0
    assert float((got - xa.grad).abs().max() / xa.grad.abs().max()) < 1e-4


def test_bench_lpips_workload_baseline_is_the_package(rel_err):
    """The lpips workload: VGG16 pairs in [-1, 1], and its PyTorch baseline (the lpips
    package's module with the run's trunk) agrees with our reference."""
    from perceptual_engine.bench import workloads as W
    from perceptual_engine.bench.lpips_baseline import LpipsPackage
    from perceptual_engine.spec import FeatureSpec
    from perceptual_engine.weights import load_weights

    case = W.make_case(W.get("lpips"), FeatureSpec(weights="random", seed=4), 33, 2, n_sets=1, seed=0)
    assert case.spec.layers == L.LAYERS and case.spec.input_range == "-1,1" and case.loss is None
    x, y = (torch.from_numpy(case.sets[0][k]) for k in ("x", "y"))
    assert x.min() < -0.9 and x.max() > 0.9
    weights = load_weights(case.spec)
    with torch.no_grad():
        got = W.torch_call(case, W.torch_model(case, weights), {"x": x, "y": y})
        want = TorchLPIPS(case.spec, weights=weights)(x, y)
    assert isinstance(W.torch_model(case, weights), LpipsPackage)
    assert list(got) == list(want)
    for name in want:
        assert rel_err(got[name].numpy(), want[name].numpy()) <= 1e-5, name
