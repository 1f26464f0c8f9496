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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import kinds
from ..errors import ConfigError, ModelError
from ..spec import FeatureSpec, LossConfig, _short

FORMAT_VERSION = 3
PREFIX = "perceptual_engine."
DTYPES = ("float32", "float16")
# Bounds on a value before it is parsed: a spec or loss is a few hundred characters.
MAX_VALUE_CHARS = 65536
MAX_JSON_DEPTH = 8
# Defined here, not beside the graph modules, so reading metadata needs no torch.
GRAPH_KINDS = tuple(kinds.KINDS)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z.+!_-]{1,64}")


class Invalid(ValueError):
    """A value that does not parse; the message says what is accepted."""


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


# -- parsers: raw text -> value, raising Invalid or ConfigError ----------------------------

def _json(raw: str) -> Any:
    """json.loads within MAX_JSON_DEPTH levels (checked first: deep nesting would
    exhaust the parser's recursion), without NaN/Infinity or repeated keys."""
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', raw):
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise Invalid(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise Invalid(f"a JSON object repeats a key among {keys[:8]}")
        return dict(items)

    def constant(name: str) -> Any:
        raise Invalid(f"JSON holds {name}")

    try:
        return json.loads(raw, object_pairs_hook=pairs, parse_constant=constant)
    except Invalid:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limits
        raise Invalid(f"not JSON: {str(exc)[:80]}") from None


def _typed_object(d: Any, what: str, types: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """``d`` must be an object with exactly the keys of ``types``, each of its types."""
    if not isinstance(d, dict):
        raise Invalid(f"{what} is a JSON {type(d).__name__}, not an object")
    if set(d) != set(types):
        extra, missing = sorted(set(d) - set(types)), sorted(set(types) - set(d))
        raise Invalid(f"{what} has keys {sorted(d)[:10]}: missing {missing}, unknown {extra[:5]}")
    for key, allowed in types.items():
        v = d[key]
        if isinstance(v, bool) and bool not in allowed or not isinstance(v, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise Invalid(f"{what}.{key} is {_short(v, 40)}, not {names}")
    return d


_SPEC_TYPES = {"arch": (str,), "layers": (list,), "weights": (str,), "seed": (int,),
               "input_range": (str,), "pooling": (str,)}
_LOSS_TYPES = {"content": (dict,), "style": (dict,), "gram": (str,)}


def _spec(raw: str) -> FeatureSpec:
    return FeatureSpec.from_dict(_typed_object(_json(raw), "spec", _SPEC_TYPES))


def _loss(raw: str) -> LossConfig | None:
    d = _json(raw)
    return None if d is None else LossConfig.from_dict(_typed_object(d, "loss", _LOSS_TYPES))


# A learned head's field (named after its kind): where its weights came from.
_HEAD_TYPES = {"weights_source": (str,), "weights_sha256": (str,)}
_HEAD_EXTRA_TYPES = {"lpips": {"spatial": (bool,)}}


def _head_field(name: str) -> Callable[[str], dict[str, Any] | None]:
    types = {**_HEAD_TYPES, **_HEAD_EXTRA_TYPES.get(name, {})}

    def parse(raw: str) -> dict[str, Any] | None:
        d = _json(raw)
        if d is None:
            return None
        d = _typed_object(d, name, types)
        if not _HEX64.fullmatch(d["weights_sha256"]):
            raise Invalid(f"{name}.weights_sha256 is not 64 hex digits")
        return d

    return parse


def _one_of(accepted: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in accepted:
            raise Invalid(f"not one of {', '.join(accepted)}")
        return raw
    return parse


def _match(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not pattern.fullmatch(raw):
            raise Invalid(f"not {what}")
        return raw
    return parse


def _bool(raw: str) -> bool:
    if raw not in ("true", "false"):
        raise Invalid("not true or false")
    return raw == "true"


def _text(raw: str) -> str:
    if not raw or len(raw) > 4096 or not raw.isprintable():
        raise Invalid("empty, longer than 4096 characters or with control characters")
    return raw


@dataclass(frozen=True)
class Field:
    parse: Callable[[str], Any]
    dump: Callable[[Any], str]
    accepted: str  # for messages
    stored: bool = True  # a ModelInfo attribute (False: checked by integrity.py only)
    optional: bool = False  # written only when not None, read as None when absent


# Loss JSON keeps its key order: the order of the terms is the order of the outputs.
FIELDS: dict[str, Field] = {
    "format": Field(int, str, f"the format number {FORMAT_VERSION}"),
    "spec": Field(_spec, lambda s: json.dumps(s.to_dict(), sort_keys=True),
                  "a JSON object {arch, layers, weights, seed, input_range, pooling} that is a valid FeatureSpec"),
    "loss": Field(_loss, lambda c: json.dumps(c.to_dict() if c else None),
                  "null or a JSON object {content: {layer: weight}, style: {layer: weight}, gram}"),
    "graph": Field(_one_of(GRAPH_KINDS), str, f"one of {', '.join(GRAPH_KINDS)}"),
    "dtype": Field(_one_of(DTYPES), str, f"one of {', '.join(DTYPES)}"),
    "weights_source": Field(_text, str, "'imagenet', 'random(seed=N)' or a weights file path"),
    "weights_sha256": Field(_match(_HEX64, "64 hex digits"), str, "a SHA-256: 64 lowercase hex digits"),
    "version": Field(_match(_VERSION, "a version"), str, "a package version such as 0.1.0"),
    "grad": Field(_bool, lambda b: "true" if b else "false", "true or false"),
    "graph_sha256": Field(_match(_HEX64, "64 hex digits"), str, "a SHA-256: 64 lowercase hex digits"),
    "lpips": Field(_head_field("lpips"), lambda d: json.dumps(dict(d) if d else None, sort_keys=True),
                   "null, or for an lpips graph a JSON object {weights_source, weights_sha256, spatial}"),
    "dists": Field(_head_field("dists"), lambda d: json.dumps(dict(d) if d else None, sort_keys=True),
                   "for a dists graph a JSON object {weights_source, weights_sha256}", optional=True),
    "integrity": Field(_match(_HEX64, "64 hex digits"), str, "a SHA-256: 64 lowercase hex digits",
                       stored=False),
}


# -- checks across keys ------------------------------------------------------------------

def _no_loss(info: ModelInfo) -> None:
    if info.loss is not None:
        raise Invalid(f"{PREFIX}loss is {info.loss.to_dict()}, but a {info.graph} graph has no loss.")


def _any_loss(info: ModelInfo) -> None:
    if info.loss is None:
        raise Invalid(f"{PREFIX}loss is null, but a {info.graph} graph needs one.")
    try:
        info.loss.check_against(info.spec)
    except ConfigError as exc:
        raise Invalid(f"{PREFIX}loss does not fit {PREFIX}spec: {exc}") from None


def _style_loss(info: ModelInfo) -> None:
    _any_loss(info)
    if info.loss.content or not info.loss.style:  # type: ignore[union-attr]
        raise Invalid(f"{PREFIX}loss is {info.loss.to_dict()}, but a style graph needs style "  # type: ignore[union-attr]
                      "terms only.")


def _no_grad(rule: Callable[[ModelInfo], None]) -> Callable[[ModelInfo], None]:
    def check(info: ModelInfo) -> None:
        rule(info)
        if info.grad:
            raise Invalid(f"{PREFIX}grad is true, but a {info.graph} graph has no grad.x output.")
    return check


def _lpips_head(info: ModelInfo) -> None:
    _no_loss(info)
    if info.dists is not None:
        raise Invalid(f"{PREFIX}dists is set, but an lpips graph has no DISTS head.")
    if info.lpips is None:
        raise Invalid(f"{PREFIX}lpips is null, but an lpips graph records its linear weights there.")


def _no_head(rule: Callable[[ModelInfo], None]) -> Callable[[ModelInfo], None]:
    def check(info: ModelInfo) -> None:
        rule(info)
        if info.lpips is not None:
            raise Invalid(f"{PREFIX}lpips is set, but a {info.graph} graph has no LPIPS head.")
        if info.dists is not None:
            raise Invalid(f"{PREFIX}dists is set, but a {info.graph} graph has no DISTS head.")
    return check


def _dists_head(info: ModelInfo) -> None:
    _no_loss(info)
    if info.lpips is not None:
        raise Invalid(f"{PREFIX}lpips is set, but a dists graph has no LPIPS head.")
    if info.dists is None:
        raise Invalid(f"{PREFIX}dists is absent, but a dists graph records its alpha/beta weights there.")


# graph kind -> what its loss, grad and LPIPS head must be.
GRAPH_RULES: dict[str, Callable[[ModelInfo], None]] = {
    "features": _no_head(_no_grad(_no_loss)), "distance": _no_head(_any_loss),
    "style": _no_head(_no_grad(_style_loss)), "target": _no_head(_any_loss),
    "lpips": _lpips_head, "dists": _dists_head,
}


def _check_together(info: ModelInfo) -> None:
    GRAPH_RULES.get(info.graph, lambda i: None)(info)
    spec, source = info.spec, info.weights_source
    expected = {"random": f"random(seed={spec.seed})", "imagenet": "imagenet"}.get(spec.weights)
    if expected is not None and source != expected:
        raise Invalid(f"{PREFIX}weights_source is {_short(source, 60)}, but {PREFIX}spec has weights "
                      f"{spec.weights!r} (expected {expected!r}).")
