"""The loss formulas against a direct float64 NumPy transcription of DESIGN.md, and gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import FeatureSpec, LossConfig, TorchPerceptualLoss, losses
from perceptual_engine.errors import InputError

RTOL = 1e-5  # float32 computation vs float64 formula


def _feats(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32) * 3.0 + 0.5  # nonzero mean and spread


def np_content(fx, fy):
    d = fx.astype(np.float64) - fy.astype(np.float64)
    return (d ** 2).reshape(d.shape[0], -1).mean(axis=1)


def np_gram(f, norm):
    n, c, h, w = f.shape
    F = f.astype(np.float64).reshape(n, c, h * w)
    G = F @ F.transpose(0, 2, 1)
    return G / {"chw": c * h * w, "hw": h * w, "none": 1}[norm]


def np_style(fx, fy, norm):
    d = np_gram(fx, norm) - np_gram(fy, norm)
    return (d ** 2).reshape(d.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 16, 13, 11), (2, 3, 1, 17)])
def test_content_term(shape):
    fx, fy = _feats(shape, 1), _feats(shape, 2)
    got = losses.content_term(torch.from_numpy(fx), torch.from_numpy(fy))
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_content(fx, fy), rtol=RTOL)


@pytest.mark.parametrize("norm", ["chw", "hw", "none"])
@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 16, 13, 11)])
def test_gram(norm, shape):
    f = _feats(shape, 3)
    g = losses.gram(torch.from_numpy(f), norm)
    assert g.shape == (shape[0], shape[1], shape[1]) and g.dtype == torch.float32
    np.testing.assert_allclose(g.numpy(), np_gram(f, norm), rtol=RTOL, atol=RTOL * np.abs(np_gram(f, norm)).max())
    # Symmetric, positive semi-definite diagonal.
    assert torch.allclose(g, g.transpose(1, 2))
    assert (torch.diagonal(g, dim1=1, dim2=2) >= 0).all()


def test_gram_norms_differ_by_their_divisors():
    f = torch.from_numpy(_feats((2, 4, 5, 3), 4))
    raw = losses.gram(f, "none")
    torch.testing.assert_close(losses.gram(f, "hw") * 15, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.gram(f, "chw") * 60, raw, rtol=1e-5, atol=1e-5)


def test_gram_unknown_norm():
    with pytest.raises(ValueError, match="unknown gram norm 'cwh'"):
        losses.gram(torch.ones(1, 2, 3, 3), "cwh")


@pytest.mark.parametrize("norm", ["chw", "hw", "none"])
def test_style_term(norm):
    shape = (3, 8, 9, 13)
    fx, fy = _feats(shape, 5), _feats(shape, 6) * 0.7
    gx = losses.gram(torch.from_numpy(fx), norm)
    gy = losses.gram(torch.from_numpy(fy), norm)
    got = losses.style_term(gx, gy)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), np_style(fx, fy, norm), rtol=1e-4)


@pytest.mark.parametrize("norm", ["chw", "hw", "none"])
def test_distance_terms_total_is_the_weighted_sum(norm):
    loss = LossConfig(content={"a": 0.5, "b": 2.0}, style={"b": 3.0, "c": 0.25}, gram=norm)
    shapes = {"a": (2, 6, 11, 9), "b": (2, 12, 5, 7), "c": (2, 24, 3, 5)}
    fx = {k: _feats(s, i) for i, (k, s) in enumerate(shapes.items())}
    fy = {k: _feats(s, 10 + i) for i, (k, s) in enumerate(shapes.items())}
    got = losses.distance_terms({k: torch.from_numpy(v) for k, v in fx.items()},
                                {k: torch.from_numpy(v) for k, v in fy.items()}, loss)
    assert list(got) == ["content.a", "content.b", "style.b", "style.c", "total"]
    expected = {
        "content.a": np_content(fx["a"], fy["a"]),
        "content.b": np_content(fx["b"], fy["b"]),
        "style.b": np_style(fx["b"], fy["b"], norm),
        "style.c": np_style(fx["c"], fy["c"], norm),
    }
    expected["total"] = (0.5 * expected["content.a"] + 2.0 * expected["content.b"]
                         + 3.0 * expected["style.b"] + 0.25 * expected["style.c"])
    for k, v in expected.items():
        assert got[k].shape == (2,) and got[k].dtype == torch.float32
        np.testing.assert_allclose(got[k].numpy(), v, rtol=1e-4, err_msg=k)


def test_float16_features_reduce_in_float32_without_overflow():
    # Raw Grams of activations in the hundreds exceed float16's 65504.
    f = torch.from_numpy(np.abs(_feats((1, 8, 16, 16), 7)) * 100).half()
    assert (f.float().flatten(2) @ f.float().flatten(2).transpose(1, 2)).max() > 65504
    for norm in ("chw", "hw", "none"):
        g = losses.gram(f, norm)
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        np.testing.assert_allclose(g.numpy(), np_gram(f.float().numpy(), norm), rtol=1e-5)
    c = losses.content_term(f, f * 0.5)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()


def test_style_target_broadcasts_over_the_batch():
    loss = LossConfig(style={"a": 1.0})
    fx = torch.from_numpy(_feats((3, 4, 5, 6), 8))
    fy = torch.from_numpy(_feats((1, 4, 5, 6), 9))
    target = {"a": losses.gram(fy, "chw")}
    got = losses.distance_terms({"a": fx}, None, loss, style_target=target)
    ref = losses.distance_terms({"a": fx}, {"a": fy.expand(3, -1, -1, -1)}, loss)
    torch.testing.assert_close(got["style.a"], ref["style.a"])
    torch.testing.assert_close(got["total"], ref["total"])


# -- TorchPerceptualLoss gradients ----------------------------------------------------------

SHALLOW = FeatureSpec(layers=("relu1_2", "relu2_1"), weights="random", seed=2)


@pytest.mark.parametrize("norm", ["chw", "hw", "none"])
def test_loss_is_differentiable_wrt_x(norm):
    loss = TorchPerceptualLoss(SHALLOW, LossConfig(content={"relu1_2": 1.0},
                                                   style={"relu2_1": 1.0}, gram=norm))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 19, 23, generator=g, requires_grad=True)
    y = torch.rand(2, 3, 19, 23, generator=g)
    out = loss(x, y)
    out["total"].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().max() > 0
    # Parameters are frozen: no gradient flows into the network.
    assert all(not p.requires_grad for p in loss.parameters())


def test_loss_gradient_matches_finite_differences():
    # Directional derivative d/dt L(x + t v) at t = 0, central differences in float64
    # on the loss values (the network runs in float32, so eps is not tiny).
    loss = TorchPerceptualLoss(SHALLOW, LossConfig(content={"relu1_2": 1.0, "relu2_1": 1.0},
                                                   style={"relu1_2": 10.0}))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 12, 14, generator=g)
    y = torch.rand(1, 3, 12, 14, generator=g)
    v = torch.randn(1, 3, 12, 14, generator=g)
    v /= v.norm()
    xg = x.clone().requires_grad_(True)
    loss(xg, y)["total"].sum().backward()
    analytic = float((xg.grad * v).sum())
    eps = 1e-2
    with torch.no_grad():
        plus = float(loss(x + eps * v, y)["total"].double())
        minus = float(loss(x - eps * v, y)["total"].double())
    numeric = (plus - minus) / (2 * eps)
    assert analytic != 0
    assert numeric == pytest.approx(analytic, rel=2e-2)


def test_set_style_target_equals_broadcast_y():
    loss = TorchPerceptualLoss(SHALLOW, LossConfig(style={"relu1_2": 1.0, "relu2_1": 2.0}, gram="hw"))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 21, 17, generator=g)
    target = torch.rand(1, 3, 21, 17, generator=g)
    loss.set_style_target(target)
    cached = loss(x)
    full = loss(x, target.expand(3, -1, -1, -1).contiguous())
    assert list(cached) == ["style.relu1_2", "style.relu2_1", "total"]
    for k in full:
        assert cached[k].shape == (3,)
        torch.testing.assert_close(cached[k], full[k], rtol=1e-5, atol=1e-7)
    assert (cached["total"] > 0).all()


def test_forward_without_y():
    content = TorchPerceptualLoss(SHALLOW)  # default: content on every layer
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with pytest.raises(InputError, match=r"y was not given and no content target is set. Pass y, or call set_target\(content=image\)"):
        content(x)
    style = TorchPerceptualLoss(SHALLOW, LossConfig(style={"relu1_2": 1.0}))
    with pytest.raises(InputError, match=r"no style target is set.*set_target\(style=image\)"):
        style(x)
