"""What a trunk is: its layer table (LayerInfo rows) and its registry entry (Trunk).

Torch-free: the table is plain geometry (kernels, strides, channels, parameter shapes),
so spec checks, shapes, memory and FLOP counts ask it without importing torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# (kernel, stride, padding, ceil_mode) of one layer that changes the spatial size.
Window = tuple[int, int, int, bool]
MAX_SIDE = 1 << 16  # min_size searches up to here


def _out(h: int, window: Window) -> int:
    k, s, p, ceil = window
    span = h + 2 * p - k  # may be negative: in ceil mode a window wider than the input still fits
    n = -(-span // s) if ceil else span // s
    # ceil mode: the last window must start inside the (left-padded) input, as torch's rule.
    if ceil and n * s >= h + p:
        n -= 1
    return max(0, n + 1)


@dataclass(frozen=True)
class LayerInfo:
    """One module of the trunk's ``features``: its name, index and output geometry.

    kind: "conv" | "relu" | "pool" | "fire" (SqueezeNet's squeeze/expand block).
    kernel, stride, padding: the module's own window (1, 1, 0 for ReLU and Fire, whose
        3x3 branch is padded to keep the size).
    downsample: the total stride at the layer's output (1, 2, 4, ...); ``size(h)`` is
        the exact output side for an input side h, ``min_size`` the smallest input side
        that leaves one pixel there.
    params: the module's state-dict entries (suffix after ``features.<index>.``, shape).
    macs: multiply-accumulates per output pixel (0 for ReLU and pooling).
    """

    name: str
    index: int
    kind: str
    channels: int
    in_channels: int
    downsample: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    ceil_mode: bool = False
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    macs: int = 0
    windows: tuple[Window, ...] = field(default=(), repr=False)  # every window up to here

    def size(self, side: int) -> int:
        """The output side at this layer for an input side ``side`` (0: too small)."""
        for window in self.windows:
            side = _out(side, window)
            if side < 1:
                return 0
        return side

    @property
    def min_size(self) -> int:
        lo, hi = 1, MAX_SIDE
        while lo < hi:  # size() is non-decreasing in the side
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.size(mid) >= 1 else (mid + 1, hi)
        return lo


def conv_params(cin: int, cout: int, k: int, prefix: str = "") -> tuple[tuple[str, tuple[int, ...]], ...]:
    return ((f"{prefix}weight", (cout, cin, k, k)), (f"{prefix}bias", (cout,)))


class TableBuilder:
    """Appends LayerInfo rows in network order, tracking channels, stride and windows."""

    def __init__(self) -> None:
        self.rows: list[LayerInfo] = []
        self.channels, self.down, self.windows = 3, 1, ()

    def _add(self, name: str, kind: str, channels: int, k: int = 1, s: int = 1, p: int = 0,
             ceil: bool = False, params=(), macs: int = 0) -> None:
        if (k, s, p) != (1, 1, 0) and not (kind == "conv" and s == 1 and k == 2 * p + 1):
            self.windows = self.windows + ((k, s, p, ceil),)
        self.down *= s
        self.rows.append(LayerInfo(name, len(self.rows), kind, channels, self.channels, self.down,
                                   k, s, p, ceil, tuple(params), macs, self.windows))
        self.channels = channels

    def conv(self, name: str, cout: int, k: int, s: int = 1, p: int = 0) -> None:
        self._add(name, "conv", cout, k, s, p, params=conv_params(self.channels, cout, k),
                  macs=k * k * self.channels * cout)

    def relu(self, name: str) -> None:
        self._add(name, "relu", self.channels)

    def pool(self, name: str, k: int, s: int, ceil: bool = False) -> None:
        self._add(name, "pool", self.channels, k, s, 0, ceil)

    def fire(self, name: str, squeeze: int, e1: int, e3: int) -> None:
        cin = self.channels
        params = (conv_params(cin, squeeze, 1, "squeeze.") + conv_params(squeeze, e1, 1, "expand1x1.")
                  + conv_params(squeeze, e3, 3, "expand3x3."))
        self._add(name, "fire", e1 + e3, params=params, macs=cin * squeeze + squeeze * e1 + 9 * squeeze * e3)


@dataclass(frozen=True)
class Trunk:
    """One registered trunk: everything the package asks about a network, answered once.

    name: the arch (``FeatureSpec.arch``), torchvision's model name.
    table: its ``features`` modules in order (LayerInfo).
    default_layers: the layers a spec without ``layers`` extracts.
    url: torchvision's ImageNet checkpoint (IMAGENET1K_V1); its ``features.*`` keys are
        the state-dict layout (LayerInfo.params under ``features.<index>.``).
    poolings: the pooling variants the trunk can run ("max" first: as trained).
    mean, std: the input normalization (ImageNet's, after mapping the input range to [0, 1]).
    module: its module in this package (``trunks/<module>.py``), whose ``build(info,
        pooling)`` makes one torch module of the table (imported on first use: torch).
    grad: whether backward.py has VJPs for its modules (``grad=True`` exports, grad.x).
    index_hint: an example for "layers are named, not indexed" messages.
    """

    name: str
    label: str
    table: tuple[LayerInfo, ...]
    default_layers: tuple[str, ...]
    url: str
    module: str
    poolings: tuple[str, ...] = ("max",)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    grad: bool = True
    index_hint: str = ""

    def build(self, info: LayerInfo, pooling: str = "max"):
        """The torch module of ``info`` (torch imported here), ``pooling`` for its pools."""
        return importlib.import_module(f"{__package__}.{self.module}").build(info, pooling)

    def layer(self, name: str) -> LayerInfo | None:
        for info in self.table:
            if info.name == name:
                return info
        return None
