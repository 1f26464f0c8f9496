"""TorchFeatures against torchvision's own ``features`` run by hand (tv_reference in conftest).

Tolerance: rtol = atol = 1e-5 (same float32 convolutions, only the
normalization is written differently: an affine map vs (x - mean) / std).
"""
from __future__ import annotations

import pytest
import torch

from perceptual_engine import FeatureSpec, TorchFeatures, TorchPerceptualLoss
from perceptual_engine import layers as L
from perceptual_engine.errors import InputError
from perceptual_engine.weights import load_weights

TOL = dict(rtol=1e-5, atol=1e-5)


def _load_into(feats: torch.nn.Sequential, state) -> torch.nn.Sequential:
    """A copy of torchvision's features with our Weights loaded by index."""
    import copy

    last = max(int(k.split(".")[1]) for k in state)
    out = copy.deepcopy(feats[: last + 2])  # up to the tapped ReLU after the last conv
    for key, t in state.items():
        _, idx, what = key.split(".")
        with torch.no_grad():
            getattr(out[int(idx)], what).copy_(t)
    return out


def _images(n, h, w, seed, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * (hi - lo) + lo


def _taps(spec):
    return {L.resolve(spec.arch, n).index: n for n in spec.layers}


def _compare(got, expected, spec):
    assert list(got) == list(spec.layers)
    for name in spec.layers:
        assert got[name].shape == expected[name].shape, name
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


@pytest.mark.parametrize("arch, layers", [
    ("vgg19", ("relu1_2", "relu2_2", "relu3_4", "relu4_4")),
    ("vgg19", ("conv1_1", "conv1_2", "conv2_2", "conv3_4", "conv4_4")),  # in-place ReLU pitfall
    ("vgg19", ("relu4_4", "conv3_1", "pool2", "relu1_1")),  # any order, pools, mixed
    ("vgg16", ("relu1_2", "relu2_2", "relu3_3", "relu4_3")),
    ("vgg16", ("conv1_2", "conv3_3", "conv4_3")),
])
@pytest.mark.parametrize("n, h, w", [(1, 37, 53), (3, 32, 40)])
def test_features_match_torchvision_random_weights(arch, layers, n, h, w, tv_features, tv_reference):
    spec = FeatureSpec(arch=arch, layers=layers, weights="random", seed=9)
    weights = load_weights(spec)
    model = TorchFeatures(spec, weights=weights)
    tv = _load_into(tv_features(arch), weights.state)
    x = _images(n, h, w, seed=n * 100 + h)
    with torch.no_grad():
        got = model(x)
    _compare(got, tv_reference(tv, x, _taps(spec)), spec)


def test_conv_taps_are_pre_activation(tv_features):
    # A conv output has negative values; the ReLU after it does not.
    spec = FeatureSpec(layers=("conv2_2", "relu2_2"), weights="random", seed=9)
    with torch.no_grad():
        f = TorchFeatures(spec)(_images(2, 37, 53, seed=1))
    assert f["conv2_2"].min() < 0
    torch.testing.assert_close(f["relu2_2"], f["conv2_2"].clamp(min=0))


@pytest.mark.parametrize("arch", ["vgg19", "vgg16"])
def test_weights_file_gives_torchvision_numbers(arch, tv_features, tv_weights_file, tv_reference):
    # The whole path: torchvision state dict -> file -> our loader -> our network.
    layers = ("conv1_1", "relu2_2", "relu3_3", "conv4_2")
    spec = FeatureSpec(arch=arch, layers=layers, weights=tv_weights_file(arch, ".pth"))
    model = TorchFeatures(spec)
    x = _images(3, 37, 53, seed=2)
    with torch.no_grad():
        got = model(x)
    _compare(got, tv_reference(tv_features(arch), x, _taps(spec)), spec)


@pytest.mark.parametrize("input_range, pooling", [("-1,1", "max"), ("0,1", "avg"), ("-1,1", "avg")])
@pytest.mark.parametrize("arch", ["vgg19", "vgg16"])
def test_input_range_and_avg_pooling(arch, input_range, pooling, tv_features, tv_reference):
    layers = ("relu1_2", "relu2_2", "conv3_2", "relu4_1")
    spec = FeatureSpec(arch=arch, layers=layers, weights="random", seed=4,
                       input_range=input_range, pooling=pooling)
    weights = load_weights(spec)
    tv = _load_into(tv_features(arch), weights.state)
    lo = -1.0 if input_range == "-1,1" else 0.0
    x = _images(3, 37, 53, seed=5, lo=lo)
    with torch.no_grad():
        got = TorchFeatures(spec, weights=weights)(x)
    _compare(got, tv_reference(tv, x, _taps(spec), input_range=input_range, pooling=pooling), spec)


def test_input_range_maps_to_the_same_normalized_image():
    a = TorchFeatures(FeatureSpec(layers=("relu2_2",), weights="random", seed=1))
    b = TorchFeatures(FeatureSpec(layers=("relu2_2",), weights="random", seed=1, input_range="-1,1"))
    x01 = _images(2, 33, 35, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(a(x01)["relu2_2"], b(x01 * 2 - 1)["relu2_2"], **TOL)


def test_normalization_is_not_folded_into_conv1_1():
    # Zero padding applies to the normalized image: border pixels of conv1_1 differ
    # from those of a conv with normalization folded into its weights and bias.
    spec = FeatureSpec(layers=("conv1_1",), weights="random", seed=1)
    m = TorchFeatures(spec)
    x = _images(1, 20, 20, seed=7)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    conv = m.body[0]
    with torch.no_grad():
        expected = conv((x - mean) / std)
        torch.testing.assert_close(m(x)["conv1_1"], expected, **TOL)
        w = conv.weight / std.view(1, 3, 1, 1)
        b = conv.bias - (conv.weight * (mean / std).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
        folded = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert not torch.allclose(folded[..., 0, :], expected[..., 0, :], atol=1e-3)
    torch.testing.assert_close(folded[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)


def test_network_is_truncated_after_the_deepest_layer():
    spec = FeatureSpec(layers=("relu2_2", "conv1_2"), weights="random")
    m = TorchFeatures(spec)
    assert len(m.body) == L.resolve("vgg19", "relu2_2").index + 1
    assert all(not p.requires_grad for p in m.parameters())
    assert not m.training


def test_odd_sizes_give_floored_shapes():
    spec = FeatureSpec(weights="random", seed=0)
    with torch.no_grad():
        f = TorchFeatures(spec)(_images(1, 37, 53, seed=8))
    assert f["relu1_2"].shape == (1, 64, 37, 53)
    assert f["relu2_2"].shape == (1, 128, 18, 26)
    assert f["relu3_4"].shape == (1, 256, 9, 13)
    assert f["relu4_4"].shape == (1, 512, 4, 6)


def test_forward_validates_input():
    m = TorchFeatures(FeatureSpec(layers=("relu3_1",), weights="random"))
    with pytest.raises(InputError, match=r"x has shape \(3, 16, 16\) \(rank 3\); accepted: rank 4"):
        m(torch.rand(3, 16, 16))
    with pytest.raises(InputError, match=r"x is 3x16, too small for relu3_1 \(4x downsampling\); "
                                         r"accepted: height and width >= 4"):
        m(torch.rand(1, 3, 3, 16))
    with pytest.raises(InputError, match="NaN or Inf"):
        m(torch.full((1, 3, 8, 8), float("nan")))


def test_perceptual_loss_matches_features_and_formulas():
    spec = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=3)
    from perceptual_engine import LossConfig, losses

    cfg = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 5.0})
    loss = TorchPerceptualLoss(spec, cfg)
    feats = TorchFeatures(spec)
    x, y = _images(2, 29, 31, seed=1), _images(2, 29, 31, seed=2)
    with torch.no_grad():
        got = loss(x, y)
        fx, fy = feats(x), feats(y)
    expected = losses.distance_terms(fx, fy, cfg)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-8)
    with pytest.raises(InputError, match="x has shape .* but y has"):
        loss(x, y[:1])


def test_loss_stays_frozen_and_in_eval_inside_a_training_model():
    spec = FeatureSpec(arch="vgg16", layers=("relu1_2",), weights="random", seed=2)
    crit = TorchPerceptualLoss(spec)
    assert not crit.training and not crit.features.training

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 3, 1)
            self.crit = crit

    model = Model()
    model.train()
    model.requires_grad_(True)
    assert model.training and not crit.training and not crit.features.body.training
    assert [n for n, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    weights = [b for n, b in crit.named_buffers() if n.endswith(("weight", "bias"))]
    assert len(weights) == 4 and not any(w.requires_grad for w in weights)
    x = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    out = crit(model.head(x), torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(1)))
    out["total"].sum().backward()
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()
    assert all(w.grad is None for w in weights)
