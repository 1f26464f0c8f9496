"""Cached targets of style and target graphs: computed once, kept on the device.

A ``Target`` is immutable: ``Engine.set_target`` builds a new one (running the
network on the target images) and then swaps it in with one assignment, so a
concurrent ``distance`` call sees the old target or the new one, never none and
never a half-built one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .. import layers as _layers
from ..errors import InputError, ModelError
from .host import to_host


@dataclass(frozen=True)
class Context:
    """What building a target needs of an Engine (no import of engine.py): the model,
    the input check, and its backend's ``run`` (host arrays) and ``keep`` (to the device)."""

    path: str
    info: Any
    inputs: tuple[str, ...]
    check: Callable[..., None]
    run: Callable[[Mapping[str, np.ndarray], list[str]], dict[str, np.ndarray]]
    keep: Callable[[np.ndarray], Any]
    on_gpu: bool = False  # host runs then wait while a CUDA graph is captured

    @property
    def spec(self) -> Any:
        return self.info.spec


@dataclass(frozen=True)
class Target:
    """Feeds ``target.content.<l>`` / ``target.gram.<l>`` (OrtValues on the session's
    device) and the (H, W) of the image the content target came from."""

    feeds: Mapping[str, Any] = field(default_factory=dict)
    content_hw: tuple[int, int] | None = None


def _feature_hw(engine: Any, layer: str, h: int, w: int) -> tuple[int, int]:
    info = _layers.resolve(engine.spec.arch, layer)
    return info.size(h), info.size(w)


def _dummy_feeds(engine: Any, h: int, w: int) -> dict[str, np.ndarray]:
    """Zeros for every target input, sized for an (h, w) image (their values are not read)."""
    feeds: dict[str, np.ndarray] = {}
    for name in engine.inputs[1:]:
        kind, layer = name.split(".", 2)[1:]
        c = _layers.resolve(engine.spec.arch, layer).channels
        shape = (1, c, *_feature_hw(engine, layer, h, w)) if kind == "content" else (1, c, c)
        feeds[name] = np.zeros(shape, np.float32)
    return feeds


def _check_image(engine: Any, image: Any, what: str) -> None:
    engine.check(image, name=f"{what} target")
    if tuple(image.shape)[0] != 1:
        raise InputError(f"the {what} target has batch {tuple(image.shape)[0]}; accepted: one image, "
                         "shape (1, 3, H, W). Pass target[None] or target[:1].")


def build(engine: Context, old: Target | None, content: Any = None, style: Any = None) -> Target:
    """A new Target: ``old``'s parts, with content and/or style replaced from the images given."""
    loss = engine.info.loss
    assert loss is not None  # style and target graphs carry one
    if content is None and style is None:
        raise InputError("set_target() got neither content nor style; give an image (1, 3, H, W) for "
                         "at least one of them.")
    for what, image, terms in (("content", content, loss.content), ("style", style, loss.style)):
        if image is not None and not terms:
            raise ModelError(f"{engine.path!r} has no {what} terms, so it takes no {what} target; its "
                             f"loss is {loss.to_dict()}. Drop {what}=, or export a model with {what} terms.")
        if image is not None:
            _check_image(engine, image, what)
    feeds = dict(old.feeds) if old is not None else {}
    content_hw = old.content_hw if old is not None else None
    runs = [(image, names) for image, names in ((content, engine.info.feature_names),
                                                (style, engine.info.gram_names)) if image is not None]
    if content is not None and content is style:  # one image for both: one run
        runs = [(content, engine.info.feature_names + engine.info.gram_names)]
    for image, names in runs:
        host = to_host(image)
        h, w = host.shape[2:]
        with _gate(engine):  # host runs and copies to the GPU: not while a CUDA graph is captured
            values = engine.run({"x": host, **_dummy_feeds(engine, h, w)}, list(names))
            for name in names:
                feeds[f"target.{name.replace('feature.', 'content.')}"] = engine.keep(values[name])
        if names and names[0].startswith("feature."):
            content_hw = (int(h), int(w))
    return Target(feeds=feeds, content_hw=content_hw)


def _gate(engine: Any) -> Any:
    from .iobinding import GATE

    return GATE.shared() if engine.on_gpu else contextlib.nullcontext()


def check_ready(engine: Any, target: Target | None, x: Any) -> None:
    """Raise unless ``target`` feeds every target input, sized for x's features."""
    missing = [n for n in engine.inputs[1:] if target is None or n not in target.feeds]
    if missing:
        kinds = sorted({"style" if n.startswith("target.gram.") else "content" for n in missing})
        call = ("set_style_target(image)" if engine.info.graph == "style" else
                "set_target(" + ", ".join(f"{k}=image" for k in kinds) + ")")
        raise InputError(f"no {' and no '.join(kinds)} target is set; call engine.{call} first.")
    assert target is not None
    if target.content_hw is None:
        return
    _, _, h, w = tuple(x.shape)
    for name in engine.info.loss.content:  # type: ignore[union-attr]
        want, got = _feature_hw(engine, name, *target.content_hw), _feature_hw(engine, name, h, w)
        if want != got:
            hc, wc = target.content_hw
            raise InputError(
                f"x is {h}x{w}, so its {name} features are {got[0]}x{got[1]}, but the content target "
                f"was set from a {hc}x{wc} image ({want[0]}x{want[1]}); accepted: x of the content "
                "image's size. Set the target from an image of x's size: set_target(content=image).")
