"""The metadata keys checked against each other: ``GRAPH_RULES`` (per graph kind, what
its loss, grad and learned head must be) and the weights source the spec implies."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError
from ..spec import _short
from .metadata_fields import PREFIX, Invalid

if TYPE_CHECKING:
    from .metadata import ModelInfo

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
