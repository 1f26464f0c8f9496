"""The metadata schema: one ``FIELDS`` row per ONNX ``metadata_props`` key (its parser,
writer and what it accepts, for messages), the parsers, and the constants they check
against (``FORMAT_VERSION``, ``PREFIX``, ``DTYPES``, ``GRAPH_KINDS``, the size bounds).
A value that does not parse raises ``Invalid``; metadata.py turns it into a ModelError
naming the key."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import kinds
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
# Heads whose key every model writes (null on other kinds); a later head's key is written
# by its own kind only, and absent elsewhere (kinds.GraphKind.head_always_written).
ALWAYS_WRITTEN = tuple(k.head for k in kinds.KINDS.values() if k.head and k.head_always_written)


def _head_keys(name: str) -> tuple[kinds.HeadKey, ...]:
    """The extra keys of the head called ``name`` (kinds.GraphKind.head_keys)."""
    return next((k.head_keys for k in kinds.KINDS.values() if k.head == name), ())


def _head_json(d: Any) -> str:
    return json.dumps(dict(d) if d else None, sort_keys=True)


def _head_field(name: str) -> Callable[[str], dict[str, Any] | None]:
    keys = _head_keys(name)
    types = {**_HEAD_TYPES, **{k.name: k.types for k in keys}}
    defaults = {k.name: k.default for k in keys if k.default is not None}

    def parse(raw: str) -> dict[str, Any] | None:
        d = _json(raw)
        if d is None:
            return None
        if isinstance(d, dict):
            d = {**defaults, **d}
        d = _typed_object(d, name, types)
        if not _HEX64.fullmatch(d["weights_sha256"]):
            raise Invalid(f"{name}.weights_sha256 is not 64 hex digits")
        for key in keys:
            if key.choices is not None and d[key.name] not in key.choices:
                raise Invalid(f"{name}.{key.name} is {_short(d[key.name], 40)}, not one of "
                              f"{', '.join(key.choices)}")
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


def _static_shape(raw: str) -> tuple[int, int, int]:
    d = _json(raw)
    if (not isinstance(d, list) or len(d) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65536 for v in d)):
        raise Invalid("not a JSON list [batch, height, width] of positive integers")
    return (d[0], d[1], d[2])


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
    # One per learned head (kinds.py), named after it.
    **{k.head: Field(_head_field(k.head), _head_json,
                     ("null, or " if k.head in ALWAYS_WRITTEN else "") + f"for graph {k.name!r} a JSON object "
                     "{" + ", ".join([*_HEAD_TYPES, *(h.name for h in k.head_keys)]) + "}",
                     optional=k.head not in ALWAYS_WRITTEN)
       for k in kinds.KINDS.values() if k.head},
    # Written only when set: a reader that does not know them refuses the model.
    "static_shape": Field(_static_shape, lambda t: json.dumps(list(t)),
                          "a JSON list [batch, height, width]: the one input shape of a static-shape export",
                          optional=True),
    "output_dtype": Field(_one_of(("float16",)), str,
                          "float16 (the outputs of a --fp16-outputs export; absent: float32)", optional=True),
    "integrity": Field(_match(_HEX64, "64 hex digits"), str, "a SHA-256: 64 lowercase hex digits",
                       stored=False),
}
