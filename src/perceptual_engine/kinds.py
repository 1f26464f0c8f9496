"""The graph kinds, one entry each: what every path asks about a kind, answered once.

The exporter, metadata, verify, the Engine and its matrix runner, memory, Triton,
the command line (local and Ray) and the docs ask this registry instead of comparing
kind strings. Torch-free and import-light (floor 0: no torch, no onnx).

Adding a metric (docs/architecture.md, "Adding a metric"): its own module (spec
defaults, weights, head, VJPs, torch reference, like lpips/ and dists/), one
``GraphKind`` line below, the exporter's builder for it, and its tests; the
registry tests (tests/test_kinds.py) then hold every path to the new entry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from . import trunks as _trunks
from .lpips import nets as _lpips_nets
from .errors import ConfigError
from .outputs import dists_output_names, lpips_output_names


@dataclass(frozen=True)
class HeadKey:
    """A key of a learned head's metadata field besides ``weights_source`` and
    ``weights_sha256`` (``lpips.net``): its accepted types, the value a model written
    before the key existed means (None: the key is required), its accepted values, and
    ``of_spec``: the value the model's spec implies (``lpips.net`` is its trunk's net),
    which the recorded one must equal."""

    name: str
    types: tuple[type, ...]
    default: object = None
    choices: tuple[str, ...] | None = None
    of_spec: Callable[[object], object] | None = None


@dataclass(frozen=True)
class HeadFlag:
    """A choice option of a learned head (``--lpips-net``): a keyword of its
    ``spec_from_flags`` flags, offered by every command that takes the kind and
    refused with any other graph."""

    dest: str
    choices: tuple[str, ...]
    default: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


@dataclass(frozen=True)
class GraphKind:
    """One graph kind.

    images: images per sample: 1 (``x``) or 2 (``x`` and ``y``, run as one batch of 2N).
    grad: ``export_onnx(..., grad=True)`` adds ``grad.x``, the loss's input gradient.
    compares: a distance of two images: ``Engine.distance``, ``distance`` (local and
        ``--ray``), metrics.
    matrix: all-pairs matrices and nearest neighbours (``Engine.matrix``, ``matrix``).
    head: the module of a learned head (weights file, metadata field of that name, torch
        reference, ``--<head>-weights``), or None.
    label: how reports name it.
    tap_factor: copies held per tapped layer in the memory bound (docs/memory.md).
    tensorrt_fp32: Triton's TensorRT stays FP32 for it (a float16 head loses its
        normalization epsilon).
    head_outputs: a head's output names, in order, from (taps, spatial); None: the
        loss's (LossConfig.output_names).
    spatial: it can also output the per-pixel map ``spatial`` (``--spatial``).
    flags: the head's own choice options (``--lpips-net``), read by its ``spec_from_flags``.
    fp16_grad: a float16 export may carry ``grad.x`` (the heads' float16 backward is
        not within the verified gradient tolerance: docs/lpips.md, docs/dists.md).
    """

    name: str
    images: int
    grad: bool
    compares: bool
    matrix: bool
    head: str | None
    label: str
    tap_factor: float
    tensorrt_fp32: bool = False
    head_outputs: Callable[[tuple[str, ...], bool], tuple[str, ...]] | None = None
    spatial: bool = False
    fp16_grad: bool = True
    weights_help: str | None = None  # the --<head>-weights flag's help
    flags: tuple[HeadFlag, ...] = ()  # the head's other options (``--lpips-net``)
    head_keys: tuple[HeadKey, ...] = ()  # its metadata field's own keys (``lpips.net``)
    head_always_written: bool = False  # every model writes the head's key (null elsewhere)
    weights_name: str = "weights"  # what reports call the head's weights ("linear weights")

    def module(self) -> ModuleType | None:
        """The head's package (lpips/, dists/): ``check_spec``, ``default_spec``,
        ``resolve_weights``, ``build`` (and ``matrix_terms`` where ``matrix``); imported on
        first use (its parts need torch)."""
        return None if self.head is None else importlib.import_module(f"{__package__}.{self.head}")

    @property
    def weights_option(self) -> str | None:
        """export_onnx's keyword for the head's weights (``lpips_weights``), or None."""
        return None if self.head is None else f"{self.head}_weights"

    @property
    def weights_flag(self) -> str | None:
        """The command line's flag for the head's weights (``--lpips-weights``), or None."""
        return None if self.head is None else f"--{self.head}-weights"


KINDS: dict[str, GraphKind] = {k.name: k for k in (
    GraphKind("features", images=1, grad=False, compares=False, matrix=False, head=None,
              label="features", tap_factor=1.25),
    GraphKind("distance", images=2, grad=True, compares=True, matrix=True, head=None,
              label="distance", tap_factor=0.5),
    GraphKind("style", images=1, grad=False, compares=False, matrix=False, head=None,
              label="style", tap_factor=1.0),
    GraphKind("target", images=1, grad=True, compares=False, matrix=False, head=None,
              label="target", tap_factor=1.0),
    GraphKind("lpips", images=2, grad=True, compares=True, matrix=True, head="lpips",
              label="LPIPS", tap_factor=2.0, tensorrt_fp32=True, head_outputs=lpips_output_names,
              spatial=True, fp16_grad=False,
              weights_help="LPIPS linear weights (.pth, keys lin0..lin<K-1>.model.1.weight, one per "
                           "tap) (default: weights/v0.1/<net>.pth of the installed lpips package)",
              flags=(HeadFlag("lpips_net", tuple(_lpips_nets.NETS), _lpips_nets.DEFAULT,
                              "the LPIPS trunk, as lpips' net=: " + ", ".join(
                                  f"{n.name} ({_trunks.get(n.arch).label})" for n in _lpips_nets.NETS.values())
                              + f" (default: {_lpips_nets.DEFAULT})"),),
              # an LPIPS model written before AlexNet and SqueezeNet ran VGG16
              head_keys=(HeadKey("spatial", (bool,)),
                         HeadKey("net", (str,), default="vgg", choices=tuple(_lpips_nets.NETS),
                                 of_spec=lambda spec: getattr(_lpips_nets.for_arch(spec.arch), "name", None))),
              head_always_written=True,  # from before DISTS: every model writes "lpips" (null elsewhere)
              weights_name="linear weights"),
    GraphKind("dists", images=2, grad=True, compares=True, matrix=False, head="dists",
              label="DISTS", tap_factor=2.0, head_outputs=lambda taps, spatial: dists_output_names(taps),
              fp16_grad=False,
              weights_help="DISTS alpha/beta (.pt, keys alpha and beta, each (1, 1475, 1, 1)) "
                           "(default: weights.pt of the installed DISTS_pytorch package)",
              weights_name="alpha/beta"),
)}


def get(name: str) -> GraphKind:
    """The kind called ``name``; ConfigError naming the accepted ones otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"graph {name!r} is not a graph kind; accepted: {', '.join(KINDS)}.") from None


def names(**where: object) -> tuple[str, ...]:
    """The kinds whose attributes equal ``where``, in registry order:
    ``names(compares=True)`` -> ("distance", "lpips", "dists")."""
    return tuple(k.name for k in KINDS.values() if all(getattr(k, a) == v for a, v in where.items()))


def quoted(kinds: tuple[str, ...], last: str = "or") -> str:
    """"graph='distance', graph='lpips' or graph='dists'" for messages (the command
    line's wording turns each into "--graph distance")."""
    items = [f"graph='{k}'" for k in kinds]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
