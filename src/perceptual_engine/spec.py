"""FeatureSpec and LossConfig: what to extract and how to compare it.

Both are frozen dataclasses validated on construction, so an invalid value fails
where it is written, not deep inside an export. ``None`` defaults are resolved in
``__post_init__`` and nowhere else.
"""
from __future__ import annotations

import dataclasses

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from . import layers as _layers, trunks as _trunks
from .errors import ConfigError

DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {t.name: t.default_layers for t in _trunks.TRUNKS.values()}
INPUT_RANGES: dict[str, tuple[float, float]] = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
POOLINGS = ("max", "avg", "l2")
GRAM_NORMS = ("chw", "hw", "none")
WEIGHT_SOURCES = ("imagenet", "random")


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _choice(what: str, value: Any, accepted: tuple[str, ...], fix: str = "") -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ConfigError(
            f"{what} {_short(value)} is not accepted; accepted: {', '.join(map(repr, accepted))}.{fix}"
        )


@dataclass(frozen=True)
class FeatureSpec:
    """Which network, which layers and which weights to extract features with.

    arch: a registered trunk (``perceptual_engine.trunks``): "vgg19", "vgg16",
        "alexnet" or "squeezenet1_1".
    layers: paper names (``relu2_2``...), in the order outputs are returned;
        None means the arch's four usual style/content layers.
    weights: "imagenet" (torchvision download), "random" (seeded by ``seed``) or
        the path of a torchvision-format state dict (.pth or .safetensors).
    input_range: "0,1" or "-1,1": the range of input pixel values, mapped to
        ImageNet mean/std normalization inside the network.
    pooling: "max" (as trained), "avg" (Gatys et al.'s variant for style) or "l2"
        (DISTS: sqrt of a 3x3 Hanning-weighted sum of squares, stride 2, padding 1;
        a side of h gives ceil(h / 2)); "avg" and "l2" on the trunks that offer them (VGG).
    """

    arch: str = "vgg19"
    layers: tuple[str, ...] | None = None
    weights: str = "imagenet"
    seed: int = 0
    input_range: str = "0,1"
    pooling: str = "max"

    def __post_init__(self) -> None:
        _choice("arch", self.arch, _layers.ARCHS)
        layers = DEFAULT_LAYERS[self.arch] if self.layers is None else self.layers
        if isinstance(layers, str):
            layers = (layers,)
        if not isinstance(layers, (tuple, list)) or not all(isinstance(n, str) for n in layers):
            raise ConfigError(
                f"layers {_short(layers)} is not accepted; accepted: a list of layer names, "
                "e.g. ('relu1_2', 'relu2_2')."
            )
        layers = tuple(layers)
        if not layers:
            raise ConfigError("layers is empty; name at least one layer, e.g. ('relu2_2',).")
        for name in layers:
            _layers.resolve(self.arch, name)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers {layers} name a layer twice; list each layer once.")
        object.__setattr__(self, "layers", layers)
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(
                f"weights {_short(self.weights)} is not accepted; accepted: 'imagenet', 'random' "
                "or the path of a .pth/.safetensors state dict."
            )
        if self.weights not in WEIGHT_SOURCES and not self.weights.endswith(
            (".pth", ".pt", ".safetensors")
        ):
            raise ConfigError(
                f"weights {_short(self.weights)} is neither 'imagenet', 'random' nor a "
                ".pth/.pt/.safetensors file path; give one of those."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed {_short(self.seed)} is not an int; give an integer seed.")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed {self.seed} is out of range; accepted: 0 <= seed < 2**63 "
                              f"({2**63 - 1}). Give a smaller seed.")
        _choice("input_range", self.input_range, tuple(INPUT_RANGES))
        _choice("pooling", self.pooling, POOLINGS)
        offered = _trunks.get(self.arch).poolings
        if self.pooling not in offered:
            raise ConfigError(f"pooling {self.pooling!r} is not offered by {self.arch}; accepted: "
                              f"{', '.join(map(repr, offered))}. Drop pooling={self.pooling!r}, or use "
                              f"arch {' or '.join(_trunks.names(poolings=POOLINGS))}.")

    @property
    def deepest(self) -> str:
        """The requested layer that comes last: the network is cut after it."""
        return _layers.deepest(self.arch, self.layers).name

    @property
    def min_size(self) -> int:
        """Smallest input height/width that leaves a pixel at the deepest layer."""
        return _layers.resolve(self.arch, self.deepest).min_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        """The spec of ``to_dict``'s output; keys it does not know are ignored."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a FeatureSpec needs a mapping such as {{'arch': 'vgg19', "
                              f"'layers': ['relu2_2']}}; got {_short(d)}.")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("layers"), list):
            known["layers"] = tuple(known["layers"])
        return cls(**known)

    def key(self) -> str:
        """A short stable hash of the spec (cache keys, file names)."""
        return json_digest(self.to_dict())


def _weights_map(what: str, value: Mapping[str, float] | None) -> Mapping[str, float]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{what} must map layer names to weights, e.g. {{'relu2_2': 1.0}}; got {_short(value)}."
        )
    out: dict[str, float] = {}
    for name, w in value.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"{what} weight of {_short(name)} is {_short(w)}; accepted: a finite number >= 0."
            )
        out[str(name)] = float(w)
    return MappingProxyType(out)


@dataclass(frozen=True)
class LossConfig:
    """Per-layer weights of the content and style terms, and the Gram normalization.

    content / style: {layer: weight >= 0}; each named layer gets a term, the total
        is the weighted sum. gram: "chw" (divide F Fᵀ by C·H·W, Johnson et al.),
        "hw" (by H·W, Gatys et al.) or "none" (raw, as piq).
    """

    content: Mapping[str, float] = field(default_factory=dict)
    style: Mapping[str, float] = field(default_factory=dict)
    gram: str = "chw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "content", _weights_map("content", self.content))
        object.__setattr__(self, "style", _weights_map("style", self.style))
        _choice("gram", self.gram, GRAM_NORMS)
        if not self.content and not self.style:
            raise ConfigError(
                "LossConfig has no term; give content={'relu2_2': 1.0} and/or style={...}."
            )

    def __hash__(self) -> int:
        # frozensets: equality ignores key order, so the hash must too.
        return hash((frozenset(self.content.items()), frozenset(self.style.items()), self.gram))

    @classmethod
    def default_for(cls, spec: FeatureSpec) -> "LossConfig":
        """Content terms of weight 1 on every layer of ``spec`` (the usual perceptual loss)."""
        return cls(content={name: 1.0 for name in spec.layers})

    def check_against(self, spec: FeatureSpec) -> None:
        """Every weighted layer must be one the spec extracts."""
        for what, mapping in (("content", self.content), ("style", self.style)):
            missing = [n for n in mapping if n not in spec.layers]
            if missing:
                raise ConfigError(
                    f"{what} names layer(s) {missing} that the FeatureSpec does not extract; "
                    f"extracted: {list(spec.layers)}. Add them to FeatureSpec.layers."
                )

    def used_spec(self, spec: FeatureSpec) -> FeatureSpec:
        """``spec`` with only the layers this loss weighs (in the spec's order), so the
        network ends at the deepest layer the loss needs."""
        used = tuple(n for n in spec.layers if n in self.content or n in self.style)
        return spec if used == tuple(spec.layers) else dataclasses.replace(spec, layers=used)

    def output_names(self) -> tuple[str, ...]:
        """Names of a distance graph's outputs, in order."""
        return (
            tuple(f"content.{n}" for n in self.content)
            + tuple(f"style.{n}" for n in self.style)
            + ("total",)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"content": dict(self.content), "style": dict(self.style), "gram": self.gram}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LossConfig":
        """The config of ``to_dict``'s output; a missing or null content/style is no term."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a LossConfig needs a mapping such as {{'content': {{'relu2_2': 1.0}}}}; "
                              f"got {_short(d)}.")
        content, style = d.get("content"), d.get("style")
        return cls(content={} if content is None else content, style={} if style is None else style,
                   gram=d.get("gram", "chw"))


def json_digest(obj: Any) -> str:
    """First 16 hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
