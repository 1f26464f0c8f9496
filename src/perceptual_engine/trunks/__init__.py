"""The trunk registry: one ``Trunk`` entry per network, looked up by name.

A trunk is its layer table (names, kinds, geometry, parameter shapes, FLOPs), its
default layers, pooling variants, input normalization, weights source (torchvision's
URL and state-dict layout) and module builder. Every other module asks this registry
(through ``layers.py`` for the table) instead of comparing arch names. Torch-free and
import-light: the builders import torch when called.

Adding a trunk (docs/architecture.md, "Adding a trunk"): one module beside vgg.py
(its table and ``build``) and one line in TRUNKS below.
"""
from __future__ import annotations

from ..errors import ConfigError
from .alexnet import ALEXNET
from .base import LayerInfo, Trunk
from .squeezenet import SQUEEZENET1_1
from .vgg import VGG16, VGG19

TRUNKS: dict[str, Trunk] = {t.name: t for t in (VGG16, VGG19, ALEXNET, SQUEEZENET1_1)}


def get(name: str) -> Trunk:
    """The trunk called ``name``; ConfigError listing the registered ones otherwise."""
    try:
        return TRUNKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown arch {name!r}; accepted: {', '.join(TRUNKS)}") from None


def names(**where: object) -> tuple[str, ...]:
    """The trunks whose attributes equal ``where``, in registry order."""
    return tuple(t.name for t in TRUNKS.values() if all(getattr(t, a) == v for a, v in where.items()))


__all__ = ["LayerInfo", "TRUNKS", "Trunk", "get", "names"]
