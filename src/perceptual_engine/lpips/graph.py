"""The exported LPIPS graph: ``LpipsGraph`` (x, y -> the head's outputs [, grad.x]), its
input gradient by hand-written VJPs (``lpips_and_grad``) and ``build`` for export_onnx."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..spec import FeatureSpec
from .core import LinearWeights, head, head_pair, head_vjp, resolve_weights


def lpips_and_grad(features, x: torch.Tensor, fy: Mapping[str, torch.Tensor], lin: LinearWeights, *,
                   size: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The head's outputs (as ``head``) for x against y's features ``fy``, and
    ∂(Σ_n total_n)/∂x (N, 3, H, W) float32, by hand-written VJPs (traceable into ONNX).

    features: a ``TorchFeatures`` of an LPIPS spec. float16 networks backpropagate
    a per-sample power-of-two scaled seed (backward.loss_scale), unscaled in float32.
    """
    from .. import backward

    fx, vjp = backward.features_and_vjp(features, x)
    out = head(fx, fy, lin, size=size)
    grads = head_vjp(fx, fy, lin, torch.ones_like(out["total"]))
    if features.body[0].weight.dtype == torch.float32:
        return out, vjp(grads)
    scale = backward.loss_scale(grads)
    return out, vjp({k: g * scale for k, g in grads.items()}) / scale


# -- the exported graph ----------------------------------------------------------------

class LpipsGraph(nn.Module):
    """(x, y) (N, 3, H, W) float32 -> ``lpips.<l>`` (N,) per tap, ``total`` (N,), when
    ``spatial`` the map ``spatial`` (N, 1, H, W), and with ``grad`` last ``grad.x``
    (N, 3, H, W), ∂(Σ_n total_n)/∂x; all float32 (the head is float32 even when the
    network is float16)."""

    def __init__(self, features: nn.Module, lin: LinearWeights, spatial: bool, grad: bool = False) -> None:
        super().__init__()
        self.features, self.lin, self.spatial, self.grad = features, lin, spatial, grad

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = (x.shape[2], x.shape[3]) if self.spatial else None
        if not self.grad:
            f = self.features.extract(torch.cat([x, y]))
            return tuple(head_pair(f, x.shape[0], self.lin, size=size).values())
        fy = self.features.extract(y)
        out, gx = lpips_and_grad(self.features, x, fy, self.lin, size=size)
        return tuple(out.values()) + (gx,)


def build(traced: nn.Module, spec: FeatureSpec, weights: object, lin: LinearWeights, grad: bool,
          spatial: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the module to trace, the float32 reference to verify it against) for export_onnx."""
    from .reference import TorchLPIPS

    resolve_weights(lin, spec)  # the weights' net is the spec's
    return LpipsGraph(traced, lin, bool(spatial), grad), TorchLPIPS(spec, lin, spatial=bool(spatial), weights=weights)
