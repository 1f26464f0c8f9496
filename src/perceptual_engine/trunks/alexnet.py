"""AlexNet (torchvision's ``alexnet().features``, the "one weird trick" variant).

Names: conv1..conv5 and their relu1..relu5, pool1, pool2 (3x3, stride 2); the final
pool5 of torchvision's features is left out (no LPIPS tap needs it). LPIPS taps
relu1..relu5 (indices 1, 4, 7, 9, 11), as the lpips package's slices.
"""
from __future__ import annotations

from .base import TableBuilder, Trunk


def table():
    t = TableBuilder()
    t.conv("conv1", 64, 11, 4, 2)
    t.relu("relu1")
    t.pool("pool1", 3, 2)
    t.conv("conv2", 192, 5, 1, 2)
    t.relu("relu2")
    t.pool("pool2", 3, 2)
    t.conv("conv3", 384, 3, 1, 1)
    t.relu("relu3")
    t.conv("conv4", 256, 3, 1, 1)
    t.relu("relu4")
    t.conv("conv5", 256, 3, 1, 1)
    t.relu("relu5")
    return tuple(t.rows)


def build(info, pooling: str = "max"):
    from .modules import build_layer

    return build_layer(info, pooling)


ALEXNET = Trunk("alexnet", "AlexNet", table(), ("relu1", "relu2", "relu3", "relu4", "relu5"),
                "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "alexnet",
                index_hint="index 1 is relu1")
