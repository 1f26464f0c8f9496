"""SqueezeNet 1.1 (torchvision's ``squeezenet1_1().features``).

Names: conv1, relu1, pool1, then Fire blocks fire2..fire9 (named as in the paper,
whose fire2 is torchvision's features[3]), with pool3 and pool5 (3x3, stride 2,
ceil mode) between them. LPIPS taps relu1, fire3, fire5, fire6, fire7, fire8, fire9
(indices 1, 4, 7, 9, 10, 11, 12), as the lpips package's slices.
"""
from __future__ import annotations

from .base import TableBuilder, Trunk


def table():
    t = TableBuilder()
    t.conv("conv1", 64, 3, 2, 0)
    t.relu("relu1")
    t.pool("pool1", 3, 2, ceil=True)
    t.fire("fire2", 16, 64, 64)
    t.fire("fire3", 16, 64, 64)
    t.pool("pool3", 3, 2, ceil=True)
    t.fire("fire4", 32, 128, 128)
    t.fire("fire5", 32, 128, 128)
    t.pool("pool5", 3, 2, ceil=True)
    t.fire("fire6", 48, 192, 192)
    t.fire("fire7", 48, 192, 192)
    t.fire("fire8", 64, 256, 256)
    t.fire("fire9", 64, 256, 256)
    return tuple(t.rows)


def build(info, pooling: str = "max"):
    from .modules import build_layer

    return build_layer(info, pooling)


SQUEEZENET1_1 = Trunk("squeezenet1_1", "SqueezeNet 1.1", table(),
                      ("relu1", "fire3", "fire5", "fire6", "fire7", "fire8", "fire9"),
                      "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth", "squeezenet",
                      index_hint="index 4 is fire3")
