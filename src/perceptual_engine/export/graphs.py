"""The modules the exporter traces: the features, distance and style graphs.

Both wrap the reference's TorchFeatures and call losses.py, so the ONNX graph
computes exactly what the reference computes. For float16 the network runs in
half precision while inputs, normalization, Grams, reductions and outputs stay
float32.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backward, losses
from .. import lpips as _lpips
from ..reference import TorchFeatures
from ..spec import LossConfig

from .metadata import GRAPH_KINDS  # noqa: F401  (re-exported: the kinds these modules build)


class FeaturesGraph(nn.Module):
    """x (N, 3, H, W) float32 -> one output per layer, in spec order: float32, or
    ``output_dtype`` (float16 for a float16 network's --fp16-outputs: no Cast)."""

    output_dtype = torch.float32

    def __init__(self, features: TorchFeatures) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.features.extract(x)
        return tuple(f.to(self.output_dtype) for f in feats.values())


class DistanceGraph(nn.Module):
    """(x, y) (N, 3, H, W) float32 -> content.<l>, style.<l>, total, each (N,) float32.

    x and y run through the network as one batch of 2N, then split. With ``grad``
    the last output is ``grad.x`` (N, 3, H, W) float32, ∂(Σ_n total_n)/∂x; then x
    and y run separately, and only x's half is differentiated (backward.py).
    """

    def __init__(self, features: TorchFeatures, loss: LossConfig, grad: bool = False) -> None:
        super().__init__()
        self.features = features
        self.loss = loss
        self.grad = grad

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.grad:
            f = self.features.extract(torch.cat([x, y]))
            return tuple(losses.pair_terms(f, x.shape[0], self.loss).values())
        fy = self.features.extract(y)
        _, terms, gx = backward.loss_and_grad(self.features, self.loss, x, content=fy,
                                           style=losses.style_grams(fy, self.loss, fast=True))
        return tuple(terms.values()) + (gx,)


class TargetGraph(nn.Module):
    """x against cached targets: x (N, 3, H, W), ``target.content.<l>`` (1, C, H_l, W_l)
    per content layer (x's feature size) and ``target.gram.<l>`` (1, C, C) per style layer
    -> ``content.<l>``, ``style.<l>``, ``total`` (N,), ``grad.x`` (with ``grad``), then
    x's own ``feature.<l>`` (content layers) and ``gram.<l>`` (style layers), float32.

    Only x runs through the network. To cache targets, run the graph with the
    target image as x (any targets of the right shapes fed) and keep its
    ``feature.<l>`` / ``gram.<l>`` outputs (Engine.set_target does this).
    """

    def __init__(self, features: TorchFeatures, loss: LossConfig, grad: bool = False) -> None:
        super().__init__()
        self.features = features
        self.loss = loss
        self.grad = grad

    def forward(self, x: torch.Tensor, *target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nc = len(self.loss.content)
        content = dict(zip(self.loss.content, target[:nc]))
        style = dict(zip(self.loss.style, target[nc:]))
        gx = None
        if self.grad:
            fx, terms, gx = backward.loss_and_grad(self.features, self.loss, x, content=content, style=style)
        else:
            fx = self.features.extract(x)
            terms = losses.distance_terms(fx, content, self.loss, style_target=style, fast=True)
        out = tuple(terms.values()) + ((gx,) if gx is not None else ())
        out += tuple(fx[n].float() for n in self.loss.content)
        # gram_fast, as the gradient graph's own Grams (backward.loss_and_grad): the same
        # function here lets the exporter share them instead of computing both.
        return out + tuple(losses.style_grams(fx, self.loss, fast=True).values())


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
        gx = losses.style_grams(self.features.extract(x), self.loss, fast=True)
        terms = losses.style_terms(gx, dict(zip(self.loss.style, target)), self.loss)
        return tuple(terms.values()) + tuple(gx.values())


LpipsGraph = _lpips.LpipsGraph  # defined beside its head (lpips/graph.py); kept importable here
