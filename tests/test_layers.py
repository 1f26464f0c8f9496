"""The layer table against torchvision's own module lists."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from perceptual_engine import layers
from perceptual_engine.errors import ConfigError, PerceptualError

ARCHS = ("vgg19", "vgg16")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_name_matches_torchvision_module(arch, tv_features):
    feats = tv_features(arch)
    table = layers.table(arch)
    # One entry per module, indices 0..len-1 in network order.
    assert [info.index for info in table] == list(range(len(feats)))
    assert len(table) == len(feats)
    for name in layers.layer_names(arch):
        info = layers.resolve(arch, name)
        mod = feats[info.index]
        if name.startswith("conv"):
            assert info.kind == "conv"
            assert isinstance(mod, nn.Conv2d), (name, mod)
            assert (mod.in_channels, mod.out_channels) == (info.in_channels, info.channels), name
            assert mod.kernel_size == (3, 3) and mod.padding == (1, 1)
        elif name.startswith("relu"):
            assert info.kind == "relu"
            assert isinstance(mod, nn.ReLU), (name, mod)
            prev = feats[info.index - 1]
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == info.channels
        else:
            assert name.startswith("pool") and info.kind == "pool"
            assert isinstance(mod, nn.MaxPool2d), (name, mod)


@pytest.mark.parametrize("arch", ARCHS)
def test_names_follow_the_paper_block_by_block(arch, tv_features):
    # convB_I counts convolutions within block B, blocks being separated by pools.
    feats = tv_features(arch)
    block, conv = 1, 0
    for index, mod in enumerate(feats):
        if isinstance(mod, nn.Conv2d):
            conv += 1
            assert layers.table(arch)[index].name == f"conv{block}_{conv}"
        elif isinstance(mod, nn.ReLU):
            assert layers.table(arch)[index].name == f"relu{block}_{conv}"
        else:
            assert layers.table(arch)[index].name == f"pool{block}"
            block, conv = block + 1, 0
    assert block == 6  # five blocks


@pytest.mark.parametrize("arch, name, index", [
    ("vgg19", "relu1_2", 3), ("vgg19", "relu2_2", 8), ("vgg19", "relu3_4", 17),
    ("vgg19", "relu4_4", 26), ("vgg16", "relu1_2", 3), ("vgg16", "relu2_2", 8),
    ("vgg16", "relu3_3", 15), ("vgg16", "relu4_3", 22),
    # The indices of the widely copied snippet (0, 5, 10, 19) are convolutions.
    ("vgg19", "conv1_1", 0), ("vgg19", "conv2_1", 5), ("vgg19", "conv3_1", 10),
    ("vgg19", "conv4_1", 19),
])
def test_design_indices(arch, name, index):
    assert layers.resolve(arch, name).index == index


@pytest.mark.parametrize("arch", ARCHS)
def test_downsample_matches_real_output_sizes(arch, tv_features):
    feats = tv_features(arch)
    h, w = 37, 53
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for info, mod in zip(layers.table(arch), feats):
            x = mod(x)
            assert tuple(x.shape[2:]) == (h // info.downsample, w // info.downsample), info.name
            assert x.shape[1] == info.channels, info.name
            assert info.min_size == info.downsample


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown layer 'relu4_5' for vgg19; accepted: conv1_1, "
                                          r"relu1_1, .*relu4_4, .*pool5") as exc:
        layers.resolve("vgg19", "relu4_5")
    assert isinstance(exc.value, PerceptualError)
    for name in layers.layer_names("vgg19"):
        assert name in str(exc.value)


def test_vgg16_has_no_fourth_conv_in_block_3():
    with pytest.raises(ConfigError, match="accepted: .*relu3_3"):
        layers.resolve("vgg16", "relu3_4")


@pytest.mark.parametrize("name", ["3", "26", 3])
def test_digit_names_get_the_named_not_indexed_hint(name):
    with pytest.raises(ConfigError, match="Layers are named, not indexed: index 3 is relu1_2"):
        layers.resolve("vgg19", name)


def test_unknown_arch_lists_archs():
    with pytest.raises(ConfigError, match="unknown arch 'resnet50'; accepted: vgg16, vgg19"):
        layers.table("resnet50")


def test_deepest_is_by_network_order_not_argument_order():
    assert layers.deepest("vgg19", ("relu4_4", "relu1_2", "conv3_1")).name == "relu4_4"
    assert layers.deepest("vgg19", ("conv3_1", "relu2_2")).name == "conv3_1"
    assert layers.deepest("vgg16", ("pool2", "relu2_2")).name == "pool2"


def test_conv_flops_vgg19_relu4_4_224():
    # 2 FLOPs per MAC, 3x3 kernels: 2*9*Cin*Cout*H*W per convolution, H, W halving per pool.
    expected = 2 * 9 * (
        224 * 224 * (3 * 64 + 64 * 64)
        + 112 * 112 * (64 * 128 + 128 * 128)
        + 56 * 56 * (128 * 256 + 3 * 256 * 256)
        + 28 * 28 * (256 * 512 + 3 * 512 * 512)
    )
    assert layers.conv_flops("vgg19", "relu4_4", 224, 224) == expected
    assert expected == pytest.approx(35.3e9, rel=2e-3)


def test_conv_flops_counts_convs_up_to_the_layer_only():
    one = 2 * 9 * 3 * 64 * 37 * 53
    assert layers.conv_flops("vgg19", "conv1_1", 37, 53) == one
    assert layers.conv_flops("vgg19", "relu1_1", 37, 53) == one
    two = one + 2 * 9 * 64 * 64 * 37 * 53
    assert layers.conv_flops("vgg19", "pool1", 37, 53) == two
    # conv2_1 runs at the floored half size.
    assert layers.conv_flops("vgg19", "conv2_1", 37, 53) == two + 2 * 9 * 64 * 128 * 18 * 26
    # vgg16 to relu4_3 at 224: block 3 and 4 have three convolutions.
    v16 = 2 * 9 * (224 * 224 * (3 * 64 + 64 * 64) + 112 * 112 * (64 * 128 + 128 * 128)
                   + 56 * 56 * (128 * 256 + 2 * 256 * 256) + 28 * 28 * (256 * 512 + 2 * 512 * 512))
    assert layers.conv_flops("vgg16", "relu4_3", 224, 224) == v16
