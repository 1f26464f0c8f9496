"""LPIPS' three trunks, as the lpips package names them (``LPIPS(net=...)``).

Torch-free (the command line's ``--lpips-net`` choices and the metadata's ``lpips.net``
read it without importing torch); the lpips package owns it. Each net is a registered
trunk (``trunks/``) at the lpips package's taps (the ends of its slices), with the
linear weights ``weights/v0.1/<net>.pth`` of the lpips wheel.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import trunks as _trunks
from ..errors import ConfigError


@dataclass(frozen=True)
class LpipsNet:
    """name: lpips' ``net`` ("alex", "squeeze", "vgg"); arch: the trunk; layers: the taps."""

    name: str
    arch: str
    layers: tuple[str, ...]

    @property
    def label(self) -> str:
        """How reports name it: "LPIPS (VGG16)"."""
        return f"LPIPS ({_trunks.get(self.arch).label})"

    @property
    def weights_file(self) -> str:
        """The lpips wheel's linear weights, relative to the package folder."""
        return f"weights/v0.1/{self.name}.pth"

    def channels(self) -> tuple[int, ...]:
        trunk = _trunks.get(self.arch)
        return tuple(trunk.layer(n).channels for n in self.layers)  # type: ignore[union-attr]


NETS: dict[str, LpipsNet] = {n.name: n for n in (
    LpipsNet("alex", "alexnet", ("relu1", "relu2", "relu3", "relu4", "relu5")),
    LpipsNet("squeeze", "squeezenet1_1", ("relu1", "fire3", "fire5", "fire6", "fire7", "fire8", "fire9")),
    LpipsNet("vgg", "vgg16", ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")),
)}
DEFAULT = "vgg"  # the lpips package's default is "alex"; ours stays VGG16, as before


def get(name: str) -> LpipsNet:
    """The net called ``name``; ConfigError listing the accepted ones otherwise."""
    try:
        return NETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"LPIPS net {name!r} is not accepted; accepted: {', '.join(NETS)}.") from None


def for_arch(arch: str) -> LpipsNet | None:
    """The net whose trunk is ``arch``, or None."""
    return next((n for n in NETS.values() if n.arch == arch), None)
