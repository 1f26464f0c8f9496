"""VGG16 and VGG19 (Simonyan & Zisserman): 3x3 convolutions, blocks closed by 2x2 pools.

Layer names are the paper's: ``conv3_4`` is the fourth convolution of the third block,
``relu3_4`` its activation, ``pool3`` the pool that closes the block.
"""
from __future__ import annotations

from .base import TableBuilder, Trunk

_BLOCKS = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def table(arch: str):
    t = TableBuilder()
    for b, convs in enumerate(_BLOCKS[arch], start=1):
        for i, width in enumerate(convs, start=1):
            t.conv(f"conv{b}_{i}", width, 3, 1, 1)
            t.relu(f"relu{b}_{i}")
        t.pool(f"pool{b}", 2, 2)
    return tuple(t.rows)


def build(info, pooling: str = "max"):
    from .modules import build_layer

    return build_layer(info, pooling)


_HINT = "index 3 is relu1_2"
VGG16 = Trunk("vgg16", "VGG16", table("vgg16"), ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
              "https://download.pytorch.org/models/vgg16-397923af.pth", "vgg",
              poolings=("max", "avg", "l2"), index_hint=_HINT)
VGG19 = Trunk("vgg19", "VGG19", table("vgg19"), ("relu1_2", "relu2_2", "relu3_4", "relu4_4"),
              "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", "vgg",
              poolings=("max", "avg", "l2"), index_hint=_HINT)
