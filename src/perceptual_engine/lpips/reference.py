"""``TorchLPIPS``: LPIPS on the PyTorch reference network (autograd), what exports are
verified against."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..reference import TorchFeatures
from ..spec import FeatureSpec
from ..validate import check_pair
from ..weights import Weights
from . import core as _lpips


class TorchLPIPS(nn.Module):
    """LPIPS (lpips v0.1; VGG16, AlexNet or SqueezeNet 1.1) on the reference network:
    ``forward(x, y) -> {"lpips.<l>": (N,), "total": (N,)[, "spatial": (N, 1, H, W)]}``, float32.

    spec: a net's trunk at its taps (see ``lpips.default_spec(weights, net=...)``); its
        input range is the images' ("-1,1" as lpips, "0,1" as its normalize=True).
    lpips_weights: LinearWeights of the spec's net, a .pth path, or None for the lpips
        package's file of that net.
    spatial: also return the per-pixel map, as lpips' spatial=True.
    Differentiable by autograd (NaN where a feature vector is exactly zero, as lpips).
    """

    def __init__(self, spec: FeatureSpec, lpips_weights: "_lpips.LinearWeights | str | None" = None,
                 *, spatial: bool = False, weights: Weights | None = None) -> None:
        super().__init__()
        _lpips.check_spec(spec)
        self.spec, self.spatial = spec, spatial
        lin = _lpips.resolve_weights(lpips_weights, spec)
        self._lin = lin
        for i, w in enumerate(lin.weights):  # buffers: .to(device) moves them with the network
            self.register_buffer(f"lin{i}", w.clone(), persistent=False)
        self.features = TorchFeatures(spec, weights=weights)

    @property
    def lin(self) -> "_lpips.LinearWeights":
        """The linear weights, on the module's device."""
        weights = tuple(getattr(self, f"lin{i}") for i in range(len(self._lin.weights)))
        return dataclasses.replace(self._lin, weights=weights)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Without input validation (the exporter traces this)."""
        fx, fy = self.features.extract_pair(x, y)
        return _lpips.head(fx, fy, self.lin, size=tuple(x.shape[2:]) if self.spatial else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(x, y, self.spec)
        return self.terms(x, y)
