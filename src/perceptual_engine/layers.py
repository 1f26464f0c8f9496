"""Layer names of the VGG paper <-> indices into torchvision's ``vgg*.features``.

This is the one table of the package: every other module asks it, never counts
modules itself. ``conv3_4`` is the fourth convolution of the third block,
``relu3_4`` its activation, ``pool3`` the max pooling that closes the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import ConfigError

# Output channels per convolution, grouped by block; every block ends in a pool.
_BLOCKS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

ARCHS: tuple[str, ...] = tuple(_BLOCKS)


@dataclass(frozen=True)
class LayerInfo:
    """One module of ``features``: its paper name, index and output geometry.

    ``downsample`` is the total stride at the layer's output (1, 2, 4, ...), so an
    input of H x W gives ``H // downsample`` x ``W // downsample`` there (floor at
    each pool). ``min_size`` is the smallest input side that still leaves one pixel.
    """

    name: str
    index: int
    kind: str  # "conv" | "relu" | "pool"
    channels: int
    in_channels: int
    downsample: int

    @property
    def min_size(self) -> int:
        return self.downsample


@lru_cache(maxsize=None)
def table(arch: str) -> tuple[LayerInfo, ...]:
    """All layers of ``arch`` in network order."""
    if arch not in _BLOCKS:
        raise ConfigError(f"unknown arch {arch!r}; accepted: {', '.join(ARCHS)}")
    out: list[LayerInfo] = []
    index, channels, down = 0, 3, 1
    for b, convs in enumerate(_BLOCKS[arch], start=1):
        for i, width in enumerate(convs, start=1):
            out.append(LayerInfo(f"conv{b}_{i}", index, "conv", width, channels, down))
            out.append(LayerInfo(f"relu{b}_{i}", index + 1, "relu", width, width, down))
            index, channels = index + 2, width
        down *= 2
        out.append(LayerInfo(f"pool{b}", index, "pool", channels, channels, down))
        index += 1
    return tuple(out)


def layer_names(arch: str) -> tuple[str, ...]:
    return tuple(info.name for info in table(arch))


def resolve(arch: str, name: str) -> LayerInfo:
    """The LayerInfo for ``name``; unknown names fail and list the valid ones."""
    for info in table(arch):
        if info.name == name:
            return info
    valid = ", ".join(layer_names(arch))
    hint = ""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        hint = " Layers are named, not indexed: index 3 is relu1_2, for example."
    raise ConfigError(f"unknown layer {name!r} for {arch}; accepted: {valid}.{hint}")


def deepest(arch: str, names: tuple[str, ...]) -> LayerInfo:
    """The requested layer that comes last in the network (where it is cut)."""
    return max((resolve(arch, n) for n in names), key=lambda info: info.index)


def conv_flops(arch: str, upto: str, height: int, width: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions up to ``upto`` for one image.

    Counts convolutions only (ReLU and pooling are negligible); 3x3 kernels, padding 1.
    """
    last = resolve(arch, upto).index
    flops, h, w = 0, height, width
    for info in table(arch):
        if info.index > last:
            break
        if info.kind == "conv":
            flops += 2 * 9 * info.in_channels * info.channels * h * w
        elif info.kind == "pool":
            h, w = h // 2, w // 2
    return flops
