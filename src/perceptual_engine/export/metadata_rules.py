"""The metadata keys checked against each other: ``GRAPH_RULES`` (per graph kind, what
its loss, grad and learned head must be) and the weights source the spec implies."""
from __future__ import annotations

from typing import Callable, Protocol

from .. import kinds
from ..errors import ConfigError
from ..spec import FeatureSpec, LossConfig, _short
from .metadata_fields import ALWAYS_WRITTEN, PREFIX, Invalid


class ModelInfo(Protocol):
    """What the rules read of a ``metadata.ModelInfo`` (which imports this module, so
    the rules name its attributes here rather than import it)."""

    spec: FeatureSpec
    loss: LossConfig | None
    graph: str
    dtype: str
    weights_source: str
    grad: bool
    static_shape: tuple[int, int, int] | None
    output_dtype: str | None  # a head's field (``info.lpips``) is read by name: getattr

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


def _heads(info: ModelInfo, own: str | None) -> None:
    """Only the kind's own learned head (kinds.py) is recorded, and it is."""
    for kind in kinds.KINDS.values():
        if kind.head is None:
            continue
        value = getattr(info, kind.head)
        if kind.head == own and value is None:
            raise Invalid(f"{PREFIX}{kind.head} is {'null' if kind.head in ALWAYS_WRITTEN else 'absent'}, "
                          f"but a {info.graph} graph records its {kind.label} weights there.")
        if kind.head != own and value is not None:
            raise Invalid(f"{PREFIX}{kind.head} is set, but a {info.graph} graph has no {kind.label} head.")
        for key in kind.head_keys if value is not None else ():
            implied = key.of_spec(info.spec) if key.of_spec is not None else value[key.name]
            if value[key.name] != implied:
                raise Invalid(f"{PREFIX}{kind.head}.{key.name} is {_short(value[key.name], 40)}, but "
                              f"{PREFIX}spec (arch {info.spec.arch!r}) implies {_short(implied, 40)}.")


def _with_heads(rule: Callable[[ModelInfo], None]) -> Callable[[ModelInfo], None]:
    def check(info: ModelInfo) -> None:
        rule(info)
        _heads(info, kinds.get(info.graph).head)
    return check


# graph kind -> what its loss, grad and learned head must be. A learned head's kind has
# no loss; the others keep their own rules.
_LOSS_RULES: dict[str, Callable[[ModelInfo], None]] = {
    "features": _no_grad(_no_loss), "distance": _any_loss,
    "style": _no_grad(_style_loss), "target": _any_loss,
}
GRAPH_RULES: dict[str, Callable[[ModelInfo], None]] = {
    name: _with_heads(_LOSS_RULES.get(name, _no_loss)) for name in kinds.KINDS
}


# Graph kinds a static-shape export may have: the ones whose every input follows x's
# shape (a style or target graph also runs its target images, of other sizes, as x).
STATIC_SHAPE_KINDS = ("features",) + tuple(k.name for k in kinds.KINDS.values() if k.compares)


def _export_options(info: ModelInfo) -> None:
    if info.static_shape is not None:
        if info.graph not in STATIC_SHAPE_KINDS:
            raise Invalid(f"{PREFIX}static_shape is set, but a {info.graph} graph is exported with dynamic "
                          f"shapes only (static: {', '.join(STATIC_SHAPE_KINDS)}).")
        if min(info.static_shape[1:]) < info.spec.min_size:
            raise Invalid(f"{PREFIX}static_shape {list(info.static_shape)} is smaller than the spec's "
                          f"smallest side {info.spec.min_size}.")
    if info.output_dtype is not None and (info.graph != "features" or info.dtype != "float16"):
        raise Invalid(f"{PREFIX}output_dtype is {info.output_dtype}, but only a float16 features graph has "
                      f"float16 outputs (this is a {info.dtype} {info.graph} graph).")


def _check_together(info: ModelInfo) -> None:
    GRAPH_RULES.get(info.graph, lambda i: None)(info)
    _export_options(info)
    spec, source = info.spec, info.weights_source
    expected = {"random": f"random(seed={spec.seed})", "imagenet": "imagenet"}.get(spec.weights)
    if expected is not None and source != expected:
        raise Invalid(f"{PREFIX}weights_source is {_short(source, 60)}, but {PREFIX}spec has weights "
                      f"{spec.weights!r} (expected {expected!r}).")
