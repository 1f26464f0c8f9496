"""Torch modules of layer-table rows: what every trunk's ``build`` returns (torch here).

Each row becomes torchvision's own module kind with torchvision's geometry, so a
torchvision state dict loads by key (``features.<index>.<param>``): nn.Conv2d, nn.ReLU
(out of place: a tapped output must not be overwritten), nn.MaxPool2d, and
torchvision's ``Fire`` (its ReLUs made out of place too).
"""
from __future__ import annotations

from torch import nn

from .base import LayerInfo


def build_layer(info: LayerInfo, pooling: str = "max") -> nn.Module:
    if info.kind == "conv":
        return nn.Conv2d(info.in_channels, info.channels, info.kernel, stride=info.stride, padding=info.padding)
    if info.kind == "relu":
        return nn.ReLU(inplace=False)
    if info.kind == "pool":
        if pooling == "max":
            return nn.MaxPool2d(info.kernel, info.stride, ceil_mode=info.ceil_mode)
        if pooling == "l2":
            from ..reference import L2Pool  # DISTS' pooling, beside the reference network

            return L2Pool(info.channels)
        return nn.AvgPool2d(info.kernel, info.stride)
    if info.kind == "fire":
        from torchvision.models.squeezenet import Fire

        shapes = dict(info.params)
        fire = Fire(info.in_channels, shapes["squeeze.bias"][0], shapes["expand1x1.bias"][0],
                    shapes["expand3x3.bias"][0])
        for name in ("squeeze_activation", "expand1x1_activation", "expand3x3_activation"):
            setattr(fire, name, nn.ReLU(inplace=False))
        return fire
    raise ValueError(f"no module for layer kind {info.kind!r}")
