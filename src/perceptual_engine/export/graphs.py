"""The modules the exporter traces: the features, distance and style graphs.

Both wrap the reference's TorchFeatures and call losses.py, so the ONNX graph
computes exactly what the reference computes. For float16 the network runs in
half precision while inputs, normalization, Grams, reductions and outputs stay
float32.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import losses
from .. import lpips as _lpips
from ..reference import TorchFeatures
from ..spec import LossConfig

GRAPH_KINDS = ("features", "distance", "style", "lpips")


class FeaturesGraph(nn.Module):
    """x (N, 3, H, W) float32 -> one float32 output per layer, in spec order."""

    def __init__(self, features: TorchFeatures) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.features.extract(x)
        return tuple(f.float() for f in feats.values())


class DistanceGraph(nn.Module):
    """(x, y) (N, 3, H, W) float32 -> content.<l>, style.<l>, total, each (N,) float32.

    x and y run through the network as one batch of 2N, then split.
    """

    def __init__(self, features: TorchFeatures, loss: LossConfig) -> None:
        super().__init__()
        self.features = features
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fx, fy = self.features.extract_pair(x, y)
        return tuple(losses.distance_terms(fx, fy, self.loss).values())


class StyleGraph(nn.Module):
    """Style distance against a cached target: x (N, 3, H, W) and the target's Grams
    ``target.gram.<l>`` (1, C, C) -> ``style.<l>``, ``total`` (N,) and x's own Grams ``gram.<l>``.

    The network runs on x only. To cache a target, run the graph once with the
    target as x (any Grams fed) and keep its ``gram.<l>`` outputs.
    """

    def __init__(self, features: TorchFeatures, loss: LossConfig) -> None:
        super().__init__()
        self.features = features
        self.loss = loss

    def forward(self, x: torch.Tensor, *target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gx = losses.style_grams(self.features.extract(x), self.loss)
        terms = losses.style_terms(gx, dict(zip(self.loss.style, target)), self.loss)
        return tuple(terms.values()) + tuple(gx.values())


class LpipsGraph(nn.Module):
    """(x, y) (N, 3, H, W) float32 -> ``lpips.<l>`` (N,) per tap, ``total`` (N,) and, when
    ``spatial``, the map ``spatial`` (N, 1, H, W); all float32 (the head is float32
    even when the network is float16: see lpips.py)."""

    def __init__(self, features: TorchFeatures, lin: "_lpips.LinearWeights", spatial: bool) -> None:
        super().__init__()
        self.features, self.lin, self.spatial = features, lin, spatial

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fx, fy = self.features.extract_pair(x, y)
        size = (x.shape[2], x.shape[3]) if self.spatial else None
        return tuple(_lpips.head(fx, fy, self.lin, size=size).values())
