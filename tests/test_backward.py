"""backward.py: each VJP against torch autograd, op by op; then the whole input
gradient against an independent float64 computation (torchvision's VGG by hand).

Tolerance: relative error max|a − b| / max|b| ≤ 1e-4 (float32 against float64);
max pooling forgives ≤ 0.1% of elements at argmax near-ties (gradref.assert_grad_close).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceptual_engine import FeatureSpec, LossConfig, TorchFeatures, backward, losses
from perceptual_engine.reference import Normalize

import gradref

TOL = 1e-4


def _autograd_vjp(fn, inp, g):
    inp = inp.clone().requires_grad_()
    fn(inp).backward(g)
    return inp.grad


def _close(a, b, tol=1e-6):
    scale = b.abs().max()
    assert scale > 0
    assert ((a - b).abs().max() / scale) <= tol, float((a - b).abs().max() / scale)


# -- op by op -------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(9, 13), (10, 7)])
def test_pool_and_relu_vjps(h, w):
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 3, h, w, generator=gen)
    g = torch.randn(2, 3, h // 2, w // 2, generator=gen)
    out = F.max_pool2d(x, 2, 2)
    _close(backward.max_pool_vjp(g, x, out), _autograd_vjp(lambda t: F.max_pool2d(t, 2, 2), x, g))
    _close(backward.avg_pool_vjp(g, x), _autograd_vjp(lambda t: F.avg_pool2d(t, 2, 2), x, g))
    gr = torch.randn(2, 3, h, w, generator=gen)
    _close(backward.relu_vjp(gr, torch.relu(x)), _autograd_vjp(torch.relu, x, gr))


def test_max_pool_ties_do_not_double_count():
    # Integer values in {0, 1, 2}: most windows hold tied maxima. The gradient goes to one
    # element per window (the first in scan order, as PyTorch's kernel), so sums match g.
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (2, 4, 11, 9), generator=gen).float()
    g = torch.randn(2, 4, 5, 4, generator=gen)
    got = backward.max_pool_vjp(g, x, F.max_pool2d(x, 2, 2))
    assert torch.equal(got, _autograd_vjp(lambda t: F.max_pool2d(t, 2, 2), x, g))
    assert torch.allclose(got.sum(dim=(2, 3)), g.sum(dim=(2, 3)), atol=1e-5)
    assert (got[:, :, 10, :] == 0).all() and (got[:, :, :, 8] == 0).all()  # floored away


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_max_pool_vjp_every_tie_pattern_on_odd_sides(dtype):
    # 16 windows holding the 16 patterns of 0/1 values (every set of tied maxima, the
    # 4-way ties of 0 and of 1 included), on 9×9 sides: the last row and column, in no
    # window, hold the largest value and must get nothing. Exactly nn.MaxPool2d's gradient.
    x = torch.full((1, 1, 9, 9), 5.0)
    for m in range(16):
        r, c = 2 * (m // 4), 2 * (m % 4)
        x[0, 0, r:r + 2, c:c + 2] = torch.tensor([(m >> k) & 1 for k in range(4)], dtype=torch.float32).view(2, 2)
    g = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    want = _autograd_vjp(torch.nn.MaxPool2d(2, 2), x, g)
    xd, gd = x.to(dtype), g.to(dtype)
    got = backward.max_pool_vjp(gd, xd, F.max_pool2d(xd, 2, 2))
    assert got.dtype == dtype
    assert torch.equal(got.float(), want.to(dtype).float())


def test_conv_and_normalize_vjps():
    gen = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(2, 5, 11, 8, generator=gen)
    g = torch.randn(2, 7, 11, 8, generator=gen)
    _close(backward.conv_vjp(g, conv), _autograd_vjp(lambda t: conv(t), x, g), 1e-5)
    norm = Normalize("-1,1")
    gx = torch.randn(2, 3, 11, 8, generator=gen)
    _close(backward.normalize_vjp(gx, norm.scale), _autograd_vjp(norm, x[:, :3], gx))


@pytest.mark.parametrize("norm", ["chw", "hw", "none"])
def test_content_and_style_vjps(norm):
    gen = torch.Generator().manual_seed(2)
    fx = torch.rand(3, 6, 7, 5, generator=gen)
    fy = torch.rand(1, 6, 7, 5, generator=gen)  # a cached target, broadcast over the batch
    seed = torch.rand(3, generator=gen)
    target = losses.gram(fy, norm)
    _close(backward.content_vjp(fx, fy, seed),
           _autograd_vjp(lambda t: (seed * losses.content_term(t, fy)).sum(), fx, torch.tensor(1.0)))
    _close(backward.style_vjp(fx, target, norm, seed),
           _autograd_vjp(lambda t: (seed * losses.style_term(losses.gram(t, norm), target)).sum(), fx,
                         torch.tensor(1.0)), 1e-5)


# -- the whole gradient against torchvision by hand, float64 ----------------------------------
# Cheap settings (shallow taps, small odd images) that together cover both archs, both
# poolings, both input ranges, all Gram norms, conv/relu/pool taps, content only, style
# only and both, batch 1 and 3, pairs and cached targets.
CASES = [
    # arch, pooling, range, gram, content, style, n, targets
    ("vgg19", "max", "0,1", "chw", {"conv1_1": 1.0, "relu2_1": 0.5}, {"relu1_2": 2.0, "pool1": 1.0}, 3, False),
    ("vgg19", "avg", "-1,1", "hw", {"relu1_2": 1.0}, {}, 1, False),
    ("vgg16", "max", "-1,1", "none", {}, {"relu1_2": 1.0, "conv2_1": 0.3}, 3, True),
    ("vgg16", "avg", "0,1", "chw", {"pool1": 1.0}, {"relu2_1": 1.0}, 1, True),
    ("vgg19", "max", "0,1", "hw", {"relu2_1": 1.0}, {"relu1_1": 0.5}, 1, True),
    ("vgg16", "max", "0,1", "chw", {"relu1_2": 1.0}, {"pool1": 1.0}, 3, False),
]


def _case_setup(tv_weights_file, arch, pooling, rng_range, gram, content, style):
    layers = tuple(dict.fromkeys([*content, *style]))
    spec = FeatureSpec(arch=arch, layers=layers, weights=tv_weights_file(arch), input_range=rng_range,
                       pooling=pooling)
    return spec, LossConfig(content=content, style=style, gram=gram)


@pytest.mark.parametrize("arch, pooling, rng_range, gram, content, style, n, targets", CASES)
def test_input_gradient_matches_torchvision(tv_features, tv_weights_file, make_images, arch, pooling,
                                            rng_range, gram, content, style, n, targets):
    spec, loss = _case_setup(tv_weights_file, arch, pooling, rng_range, gram, content, style)
    lo = -1.0 if rng_range == "-1,1" else 0.0
    x = make_images((n, 3, 23, 19), seed=n + len(content), lo=lo)
    other = make_images((n if not targets else 1, 3, 23, 19), seed=99, lo=lo)
    style_img = make_images((1, 3, 27, 21), seed=98, lo=lo)
    w = np.random.default_rng(4).uniform(0.2, 2.0, n)
    feats = TorchFeatures(spec)
    with torch.no_grad():
        fc = feats.extract(torch.from_numpy(other))
        fs = feats.extract(torch.from_numpy(style_img if targets else other))
    _, terms, got = backward.loss_and_grad(feats, loss, torch.from_numpy(x), content=fc,
                                           style=losses.style_grams(fs, loss), seed=torch.from_numpy(w).float())
    kw = dict(content_image=other, style_image=style_img) if targets else dict(y=other)
    ref_total, ref = gradref.grad_x(tv_features(arch), spec, loss, x, weights=w, **kw)
    np.testing.assert_allclose(terms["total"].numpy(), ref_total, rtol=TOL)
    gradref.assert_grad_close(got.numpy(), ref, TOL, forgive=gradref.MAX_POOL_FORGIVE if pooling == "max" else 0.0)


def test_features_and_vjp_contract(tv_weights_file, make_images):
    spec = FeatureSpec(layers=("conv1_1", "relu1_2", "pool1"), weights=tv_weights_file("vgg19"))
    feats = TorchFeatures(spec)
    x = torch.from_numpy(make_images((2, 3, 15, 17), seed=5))
    f, vjp = backward.features_and_vjp(feats, x)
    ref = feats.extract(x)
    assert list(f) == list(ref) and all(torch.equal(f[k], ref[k]) for k in f)
    g = {"relu1_2": torch.randn(2, 64, 15, 17), "conv1_1": torch.randn(2, 64, 15, 17)}  # a subset
    xr = x.clone().requires_grad_()
    fr = feats.extract(xr)
    torch.autograd.backward([fr["relu1_2"], fr["conv1_1"]], [g["relu1_2"], g["conv1_1"]])
    _close(vjp(g), xr.grad, 1e-5)
    assert vjp(g).shape == x.shape and vjp(g).dtype == torch.float32
    with pytest.raises(ValueError, match="no tapped layer"):
        vjp({"relu2_2": g["conv1_1"]})


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_gradients_finite_on_constant_images(tv_weights_file, value):
    # Black and white images; with a zero-feature target the relu/Gram gradients vanish
    # in whole regions, which must give zeros, never NaN.
    spec = FeatureSpec(layers=("relu1_2", "pool1", "relu2_1"), weights=tv_weights_file("vgg19"))
    loss = LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0, "pool1": 1.0}, gram="chw")
    feats = TorchFeatures(spec)
    x = torch.full((2, 3, 17, 19), value)
    zero = {k: torch.zeros_like(v[:1]) for k, v in feats.extract(x).items()}
    for target in (zero, feats.extract(torch.full((1, 3, 17, 19), 1.0 - value))):
        _, terms, g = backward.loss_and_grad(feats, loss, x, content=target,
                                             style=losses.style_grams(target, loss))
        assert torch.isfinite(g).all() and torch.isfinite(terms["total"]).all()
