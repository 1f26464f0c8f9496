"""Layer names <-> indices into torchvision's ``<arch>.features``, per registered trunk.

The tables live in the trunk registry (``trunks/``); every other module asks here,
never counts modules itself. For VGG the names are the paper's: ``conv3_4`` is the
fourth convolution of the third block, ``relu3_4`` its activation, ``pool3`` the max
pooling that closes the block.
"""
from __future__ import annotations

from . import trunks as _trunks
from .errors import ConfigError
from .trunks import LayerInfo

ARCHS: tuple[str, ...] = tuple(_trunks.TRUNKS)

__all__ = ["ARCHS", "LayerInfo", "conv_flops", "deepest", "layer_names", "resolve", "table"]


def table(arch: str) -> tuple[LayerInfo, ...]:
    """All layers of ``arch`` in network order."""
    return _trunks.get(arch).table


def layer_names(arch: str) -> tuple[str, ...]:
    return tuple(info.name for info in table(arch))


def resolve(arch: str, name: str) -> LayerInfo:
    """The LayerInfo for ``name``; unknown names fail and list the valid ones."""
    trunk = _trunks.get(arch)
    info = trunk.layer(name) if isinstance(name, str) else None
    if info is not None:
        return info
    valid = ", ".join(layer_names(arch))
    hint = ""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        hint = f" Layers are named, not indexed: {trunk.index_hint}, for example."
    raise ConfigError(f"unknown layer {name!r} for {arch}; accepted: {valid}.{hint}")


def deepest(arch: str, names: tuple[str, ...]) -> LayerInfo:
    """The requested layer that comes last in the network (where it is cut)."""
    return max((resolve(arch, n) for n in names), key=lambda info: info.index)


def conv_flops(arch: str, upto: str, height: int, width: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions up to ``upto`` for one image.

    Counts convolutions only (ReLU and pooling are negligible), each at its exact
    output size (LayerInfo.macs per output pixel: a Fire block counts its three).
    """
    last = resolve(arch, upto).index
    return sum(2 * info.macs * info.size(height) * info.size(width)
               for info in table(arch)[: last + 1] if info.macs)
