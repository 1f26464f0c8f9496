"""What an exported model says about itself, in ONNX ``metadata_props``, and its schema.

The Engine reads these so a user never repeats the spec. Every key is parsed
against ``FIELDS`` (one row per key: parser, writer, what is accepted), then the
keys are checked against each other (``GRAPH_RULES``: which graphs take a loss).
Anything else is a ModelError naming the key, what it holds (shortened) and what
is accepted. To add a key: a ``ModelInfo`` attribute and a ``FIELDS`` row; to add
a graph kind: ``GRAPH_KINDS`` and a ``GRAPH_RULES`` entry.

``FORMAT_VERSION`` is bumped whenever a key is added or its meaning changes; a
reader refuses newer formats. Format 2 added ``grad`` (the model outputs
``grad.x``) and the ``target`` graph; format 3 added ``graph_sha256`` and
``integrity`` (see integrity.py) and is always written. Formats 1 and 2 carry no
digests, so their claims cannot be verified: they are refused with "re-export".

The parts: metadata_fields.py (the schema: the constants, the parsers, ``Field`` and
``FIELDS``), metadata_rules.py (``GRAPH_RULES``, the checks across keys). Their names
are re-exported here, the path callers use (``metadata.FIELDS``, ``metadata.GRAPH_KINDS``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .. import kinds
from ..errors import ConfigError, ModelError
from ..spec import FeatureSpec, LossConfig, _short
from .metadata_fields import (DTYPES, FIELDS, FORMAT_VERSION, GRAPH_KINDS, MAX_JSON_DEPTH,
                              MAX_VALUE_CHARS, PREFIX, Field, Invalid)
from .metadata_rules import GRAPH_RULES, _check_together

__all__ = [
    "ModelInfo",
    # metadata_fields.py
    "FORMAT_VERSION", "PREFIX", "DTYPES", "MAX_VALUE_CHARS", "MAX_JSON_DEPTH", "GRAPH_KINDS",
    "Invalid", "Field", "FIELDS",
    # metadata_rules.py
    "GRAPH_RULES",
]


@dataclass(frozen=True)
class ModelInfo:
    spec: FeatureSpec
    loss: LossConfig | None
    graph: str  # one of GRAPH_KINDS: "features" | "distance" | "style" | "target"
    dtype: str  # "float32" | "float16"
    weights_source: str
    weights_sha256: str
    version: str
    format: int = FORMAT_VERSION
    grad: bool = False  # outputs grad.x (N, 3, H, W), ∂(Σ_n total_n)/∂x
    graph_sha256: str = ""  # set when the model is sealed (integrity.seal)
    # graph "lpips": {"weights_source", "weights_sha256", "spatial"} of its linear head
    lpips: Mapping[str, Any] | None = None
    # graph "dists": {"weights_source", "weights_sha256"} of its alpha/beta
    dists: Mapping[str, Any] | None = None
    # (batch, height, width) of a static-shape export: the only input shape it takes
    static_shape: tuple[int, int, int] | None = None
    # "float16" for a features graph exported with fp16_outputs; None: float32 outputs
    output_dtype: str | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.graph == "features":
            return ("x",)
        if kinds.get(self.graph).images == 2:
            return ("x", "y")
        content = tuple(f"target.content.{n}" for n in self.loss.content) if self.graph == "target" else ()  # type: ignore[union-attr]
        return ("x",) + content + tuple(f"target.{g}" for g in self.gram_names)

    @property
    def gram_names(self) -> tuple[str, ...]:
        """x's Gram outputs ``gram.<l>`` of a style or target graph; its target inputs are ``target.gram.<l>``."""
        if self.graph not in ("style", "target") or self.loss is None:
            return ()
        return tuple(f"gram.{n}" for n in self.loss.style)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """x's content-layer feature outputs ``feature.<l>`` of a target graph (to cache a content target)."""
        if self.graph != "target" or self.loss is None:
            return ()
        return tuple(f"feature.{n}" for n in self.loss.content)

    @property
    def term_names(self) -> tuple[str, ...]:
        """What ``Engine.distance`` returns: the loss terms, total, and ``grad.x`` if present."""
        head_outputs = kinds.get(self.graph).head_outputs
        if head_outputs is not None:
            return head_outputs(self.spec.layers, self.spatial) + (("grad.x",) if self.grad else ())
        if self.loss is None:
            return ()
        return self.loss.output_names() + (("grad.x",) if self.grad else ())

    @property
    def output_names(self) -> tuple[str, ...]:
        if kinds.get(self.graph).head:
            return self.term_names
        if self.graph == "features" or self.loss is None:
            return tuple(self.spec.layers)
        return self.term_names + self.feature_names + self.gram_names

    @property
    def spatial(self) -> bool:
        """An LPIPS graph with the per-pixel map output ``spatial``."""
        return bool(self.lpips and self.lpips.get("spatial"))

    def to_props(self) -> dict[str, str]:
        """The metadata_props of this model (without ``integrity``, which seals them)."""
        props = {PREFIX + key: f.dump(getattr(self, key)) for key, f in FIELDS.items()
                 if f.stored and not (f.optional and getattr(self, key) is None)}
        if not self.graph_sha256:
            del props[PREFIX + "graph_sha256"]
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], path: str) -> "ModelInfo":
        """Parse ``props`` (all of a model's metadata_props) against the schema.

        Raises ModelError naming the first key that is missing, unknown or invalid.
        """
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if "format" not in ours:
            raise ModelError(
                f"{path} is an ONNX model without perceptual-engine metadata; accepted: a model "
                "written by perceptual_engine.export_onnx (or `perceptual-engine export`). "
                "Export one from a FeatureSpec."
            )
        _check_format(ours["format"], path)
        unknown = sorted(set(ours) - set(FIELDS))
        if unknown:
            raise _error(path, unknown[0], ours[unknown[0]],
                         f"only the keys {', '.join(PREFIX + k for k in FIELDS)}")
        values: dict[str, Any] = {}
        for key, f in FIELDS.items():
            if key not in ours:
                if f.optional:  # absent: its default (None); models without it stay readable
                    continue
                raise ModelError(f"{path}: metadata key {PREFIX}{key} is missing; format "
                                 f"{FORMAT_VERSION} has {f.accepted} there. Re-export the model.")
            raw = ours[key]
            if not isinstance(raw, str) or len(raw) > MAX_VALUE_CHARS:
                raise _error(path, key, raw, f"{f.accepted}, at most {MAX_VALUE_CHARS} characters")
            try:
                value = f.parse(raw)
            except (Invalid, ConfigError) as exc:
                raise _error(path, key, raw, f.accepted, why=str(exc)) from None
            if f.stored:
                values[key] = value
        info = cls(**values)
        try:
            _check_together(info)
        except (Invalid, ConfigError) as exc:
            raise ModelError(f"{path}: the metadata keys disagree: {_cut(str(exc))} The file was damaged or edited "
                             "after export: re-export the model.") from None
        return info


def _cut(text: str, limit: int = 300) -> str:
    """``text`` shortened for a one-line message: values in the file may be long."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error(path: str, key: str, raw: Any, accepted: str, why: str = "") -> ModelError:
    name = PREFIX + key if len(key) <= 64 and key.isprintable() else _short(PREFIX + key, 60)
    detail = f" ({_cut(why).rstrip('.')})" if why else ""
    return ModelError(f"{path}: metadata key {name} holds {_short(raw, 60)}{detail}; accepted: "
                      f"{accepted}. The file was damaged or edited after export: re-export the model.")


def _check_format(raw: str, path: str) -> None:
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise _error(path, "format", raw, f"a format number, {FORMAT_VERSION} for this version")
    fmt = int(raw)
    if fmt > FORMAT_VERSION:
        raise ModelError(
            f"{path} has metadata format {raw!r}; this version of perceptual-engine reads "
            f"format {FORMAT_VERSION}. Upgrade perceptual-engine or re-export the model with this version."
        )
    if fmt < FORMAT_VERSION:
        raise ModelError(
            f"{path} has metadata format {raw!r}, written by an older perceptual-engine without an "
            f"integrity digest, so its claims (spec, weights, input range) cannot be checked; this "
            f"version reads format {FORMAT_VERSION}. Re-export the model with this version."
        )
