"""Torch modules of layer-table rows: what every trunk's ``build`` returns (torch here).

Each row becomes torchvision's own module kind with torchvision's geometry, so a
torchvision state dict loads by key (``features.<index>.<param>``): nn.Conv2d, nn.ReLU
(out of place: a tapped output must not be overwritten), nn.MaxPool2d, and
torchvision's ``Fire`` (its ReLUs made out of place too).
"""
from __future__ import annotations

import torch
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


def l2_filter() -> torch.Tensor:
    """DISTS' L2-pooling window: outer(h, h) / sum, h = hanning(5)[1:-1] = (0.5, 1, 0.5), (3, 3)."""
    h = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    g = h[:, None] * h[None, :]
    return (g / g.sum()).to(torch.float32)


class L2Pool(nn.Module):
    """sqrt(conv2d(x², g, stride 2, padding 1, per channel) + 1e-12) (DISTS' L2 pooling).

    float32 (and float64): exactly that, x² as one Pow. float16: in float16, on x/16
    (``prescale``), so a square stays finite for |x| < 4096 (x² itself overflows above
    256): 16·sqrt(max(conv((x/16)², g), 2⁻²⁴)). Squares of |x| < 2⁻⁸ round to zero or a
    few subnormal bits, so the result is only good to about 2⁻⁸ absolute; the floor at
    the smallest float16 value (a result of at least 2⁻⁸, where float32 gives 1e-6 for an
    all-zero window) keeps the VJP's x·g/y bounded where the squares underflow (with y
    at 1e-6 there it was off by a factor of 80 on a VGG16 with activations near 1).
    ``prescale`` and ``pool_prescaled`` are the two halves of ``forward``, apart so that
    DISTS' statistics can reuse x/16 (dists/core.py).
    """

    EPS = 1e-12
    HALF_SCALE = 2.0 ** -4
    HALF_FLOOR = 2.0 ** -24  # the smallest positive float16

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filter", l2_filter().expand(channels, 1, 3, 3).contiguous(), persistent=False)
        # A 1-element tensor, not a scalar: the ONNX exporter's optimizer (onnxscript's
        # add_0 rule, abs_tol 1e-8) drops an Add of a scalar 1e-12 as if it were 0, and
        # sqrt(0) then puts inf into the VJP's 1/y. It leaves 1-D constants alone.
        self.register_buffer("eps", torch.full((1,), self.EPS, dtype=torch.float32), persistent=False)

    @classmethod
    def scale(cls, dtype: torch.dtype) -> float:
        """The factor ``prescale`` multiplies by in ``dtype``: 1/16 for float16, else 1."""
        return cls.HALF_SCALE if dtype == torch.float16 else 1.0

    def prescale(self, x: torch.Tensor) -> torch.Tensor:
        """x times ``scale(x.dtype)`` (x itself outside float16)."""
        k = self.scale(x.dtype)
        return x if k == 1.0 else x * k

    def _sums(self, u: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(u ** 2, self.filter.to(u.dtype), stride=2, padding=1,
                                          groups=u.shape[1])

    def root_prescaled(self, u: torch.Tensor) -> torch.Tensor:
        """sqrt(conv(u², g, ...)) in u's dtype, with no eps or floor: k times the pooled x
        for u = ``prescale(x)``, but where a window is all zero (0 there)."""
        return torch.sqrt(self._sums(u))

    def pool_prescaled(self, u: torch.Tensor) -> torch.Tensor:
        """The pooled x from u = ``prescale(x)``, in u's dtype."""
        k = self.scale(u.dtype)
        if k == 1.0:
            return torch.sqrt(self._sums(u) + self.eps.to(u.dtype))
        return torch.sqrt(torch.clamp_min(self._sums(u), self.HALF_FLOOR)) * (1.0 / k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_prescaled(self.prescale(x))
