"""The trunk registry: every registered trunk is looked up, built, measured and refused
through the same entry (trunks/), against torchvision's own module lists."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from perceptual_engine import layers, trunks
from perceptual_engine.errors import ConfigError
from perceptual_engine.reference import TorchFeatures
from perceptual_engine.spec import FeatureSpec

TRUNKS = tuple(trunks.TRUNKS)


def _torchvision(name: str) -> nn.Sequential:
    with torch.device("meta"):  # shapes only: no 100M-parameter initialization
        return torchvision.models.get_model(name).features


def test_registry_lists_every_trunk_and_layers_asks_it():
    assert TRUNKS == ("vgg16", "vgg19", "alexnet", "squeezenet1_1") == layers.ARCHS
    assert trunks.names(grad=True) == TRUNKS
    assert trunks.names(poolings=("max", "avg", "l2")) == ("vgg16", "vgg19")
    with pytest.raises(ConfigError, match="unknown arch 'resnet50'; accepted: vgg16, vgg19, alexnet, squeezenet1_1"):
        trunks.get("resnet50")
    with pytest.raises(ConfigError, match="arch 'resnet50' is not accepted; accepted: 'vgg16', 'vgg19', "
                                          "'alexnet', 'squeezenet1_1'"):
        FeatureSpec(arch="resnet50")


@pytest.mark.parametrize("name", TRUNKS)
def test_table_matches_torchvision(name):
    trunk, tv = trunks.get(name), _torchvision(name)
    assert len(trunk.table) <= len(tv)
    for info, mod in zip(trunk.table, tv):
        kind = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "pool"}.get(type(mod), "fire")
        assert info.kind == kind, (info.name, mod)
        if kind in ("conv", "pool"):
            k, s, p = (mod.kernel_size, mod.stride, mod.padding)
            as_int = [v[0] if isinstance(v, tuple) else v for v in (k, s, p)]
            assert [info.kernel, info.stride, info.padding] == as_int, info.name
        if kind == "pool":
            assert info.ceil_mode == mod.ceil_mode
        params = {f"{k}": tuple(v.shape) for k, v in mod.named_parameters()}
        assert dict(info.params) == params, info.name
    # every default layer and every index resolves, by name only
    for info in trunk.table:
        assert layers.resolve(name, info.name) is info
    with pytest.raises(ConfigError, match=f"Layers are named, not indexed: {trunk.index_hint}"):
        layers.resolve(name, "3")


@pytest.mark.parametrize("name", TRUNKS)
def test_sizes_and_flops_match_a_forward_pass(name):
    trunk, tv = trunks.get(name), _torchvision(name)
    for side in (trunk.table[-1].min_size, 67, 224):
        h, w, flops = side, side + 6, 0
        x = torch.empty(1, 3, h, w, device="meta")
        for info, mod in zip(trunk.table, tv):
            y = mod(x)
            assert tuple(y.shape[1:]) == (info.channels, info.size(h), info.size(w)), (info.name, side)
            for conv in (m for m in mod.modules() if isinstance(m, nn.Conv2d)):
                out = y if conv is mod else None
                if out is None:  # a Fire's convolutions: at the block's output size
                    out = torch.empty(1, conv.out_channels, y.shape[2], y.shape[3])
                flops += 2 * conv.weight[0].numel() * conv.out_channels * out.shape[2] * out.shape[3]
            x = y
        assert layers.conv_flops(name, trunk.table[-1].name, h, w) == flops


@pytest.mark.parametrize("name", TRUNKS)
def test_sizes_match_torchvision_on_every_small_side(name):
    # Every side from 1 to 40: LayerInfo.size is the module's own output side, 0 where
    # torch refuses the input (ceil-mode pools give 1 on sides narrower than their window).
    trunk, tv = trunks.get(name), _torchvision(name)
    for side in range(1, 41):
        x = torch.empty(1, 3, side, side, device="meta")
        for info, mod in zip(trunk.table, tv):
            try:
                x = mod(x)
                got = x.shape[2]
            except RuntimeError:
                got = 0
            assert info.size(side) == got, (info.name, side)
            if got == 0:
                break
        assert (side >= trunk.table[-1].min_size) == (trunk.table[-1].size(side) >= 1)


@pytest.mark.parametrize("name", TRUNKS)
def test_each_trunk_builds_and_runs_at_its_min_size(name):
    trunk = trunks.get(name)
    spec = FeatureSpec(arch=name, layers=(trunk.table[-1].name,), weights="random", seed=3)
    features = TorchFeatures(spec)
    assert [type(m).__name__ for m in features.body] == [type(m).__name__ for m in _torchvision(name)[: len(trunk.table)]]
    assert all(not m.inplace for m in features.body.modules() if isinstance(m, nn.ReLU))
    side = spec.min_size
    with torch.no_grad():
        out = features(torch.rand(1, 3, side, side + 1))[trunk.table[-1].name]
    assert out.shape[2:] == (1, trunk.table[-1].size(side + 1)) and torch.isfinite(out).all()
    with pytest.raises(Exception, match=f">= {side}"):
        features(torch.rand(1, 3, side - 1, side))


@pytest.mark.parametrize("name", ["alexnet", "squeezenet1_1"])
def test_pooling_variants_only_where_offered(name):
    for pooling in ("avg", "l2"):
        with pytest.raises(ConfigError, match=f"pooling '{pooling}' is not offered by {name}; accepted: 'max'"):
            FeatureSpec(arch=name, pooling=pooling)


def test_imagenet_urls_come_from_the_registry(monkeypatch):
    from perceptual_engine import weights as W

    asked = []

    def fake(url, **kw):
        asked.append(url)
        with torch.device("meta"):
            state = torchvision.models.squeezenet1_1().state_dict()
        return {k: torch.zeros(v.shape) + 0.01 for k, v in state.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    w = W.load_weights(FeatureSpec(arch="squeezenet1_1", weights="imagenet"))
    assert asked == [trunks.get("squeezenet1_1").url] and "features.12.expand3x3.weight" in w.state
    assert W.IMAGENET_URLS == {t.name: t.url for t in trunks.TRUNKS.values()}
