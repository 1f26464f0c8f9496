"""The PyTorch reference: TorchFeatures and TorchPerceptualLoss (TorchLPIPS and TorchDISTS
live in the lpips and dists packages).

The same modules are what the exporter traces, so the ONNX graphs and the
reference share one network definition and one set of formulas (losses.py).
ReLUs are out-of-place here: torchvision's in-place ReLUs would overwrite a
tapped conv output.
"""
from __future__ import annotations


from typing import Mapping

import torch
from torch import nn

from . import layers as _layers, trunks as _trunks
from . import losses
from .errors import InputError
from .spec import INPUT_RANGES, FeatureSpec, LossConfig
from .validate import check_pair, check_tensor
from .trunks.modules import L2Pool, l2_filter  # noqa: F401  (re-exported: DISTS' pooling)
from .weights import Weights, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Input range -> ImageNet-normalized: (x·a + b − mean) / std, as one affine map.

    Kept as its own op rather than folded into conv1_1: conv1_1 zero-pads the
    *normalized* image, so a folded bias would be wrong at the borders.
    """

    def __init__(self, input_range: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        lo, hi = INPUT_RANGES[input_range]
        mean = torch.tensor(mean).view(1, 3, 1, 1)
        std = torch.tensor(std).view(1, 3, 1, 1)
        # x01 = (x - lo) / (hi - lo); out = (x01 - mean) / std = x * scale + shift
        scale = 1.0 / ((hi - lo) * std)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", (-lo / (hi - lo) - mean) / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def build_layers(spec: FeatureSpec, weights: Weights) -> nn.Sequential:
    """``features`` of the arch (its trunk's modules, trunks/), truncated after the
    deepest layer, weights loaded under torchvision's keys, frozen."""
    trunk = _trunks.get(spec.arch)
    last = _layers.resolve(spec.arch, spec.deepest).index
    mods: list[nn.Module] = []
    for info in _layers.table(spec.arch)[: last + 1]:
        mod = trunk.build(info, spec.pooling)
        for suffix, _ in info.params:
            mod.get_parameter(suffix).data.copy_(weights.state[f"features.{info.index}.{suffix}"])
        mods.append(mod)
    seq = nn.Sequential(*mods).eval()
    # The pretrained weights are constants, not parameters: as buffers, a parent's
    # requires_grad_(True) or an optimizer over model.parameters() cannot unfreeze
    # them, while .half(), .to(device) and state_dict() still carry them.
    for mod in seq.modules():
        if isinstance(mod, nn.Conv2d):
            for name in ("weight", "bias"):
                value = getattr(mod, name).detach()
                del mod._parameters[name]
                mod.register_buffer(name, value)
    return seq


class _AlwaysEval(nn.Module):
    """A frozen network: ``train()`` (also through a parent's) leaves it in eval mode."""

    def train(self, mode: bool = True) -> "_AlwaysEval":
        return super().train(False)


class TorchFeatures(_AlwaysEval):
    """Trunk features at named layers: ``forward(x) -> {layer: (N, C_l, H_l, W_l)}``.

    x: float32 (N, 3, H, W) in the spec's input range, H, W >= ``spec.min_size``.
    Differentiable with respect to x; parameters are frozen.
    """

    def __init__(self, spec: FeatureSpec, *, weights: Weights | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weights_info = weights if weights is not None else load_weights(spec)
        trunk = _trunks.get(spec.arch)
        self.normalize = Normalize(spec.input_range, trunk.mean, trunk.std)
        self.body = build_layers(spec, self.weights_info)
        index_to_name = {_layers.resolve(spec.arch, n).index: n for n in spec.layers}
        self._taps = index_to_name
        self.eval()

    def extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features without input validation (the exporter traces this)."""
        h = self.normalize(x)
        if h.dtype != self.body[0].weight.dtype:
            h = h.to(self.body[0].weight.dtype)
        found: dict[str, torch.Tensor] = {}
        for i, mod in enumerate(self.body):
            h = mod(h)
            if i in self._taps:
                found[self._taps[i]] = h
        return {name: found[name] for name in self.spec.layers}

    def extract_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], ...]:
        """Features of x and of y from one pass over both (concatenated on the batch axis)."""
        n = x.shape[0]
        f = self.extract(torch.cat([x, y]))
        return {k: v[:n] for k, v in f.items()}, {k: v[n:] for k, v in f.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_tensor(x, "x", self.spec)
        return self.extract(x)


class TorchPerceptualLoss(_AlwaysEval):
    """Per-sample content/style terms and total (the formulas of losses.py), differentiable.

    ``forward(x, y) -> {"content.<l>": (N,), "style.<l>": (N,), "total": (N,)}``.
    Only x's half is differentiated when y does not require grad (x and y then run
    as two batches, y's under no_grad; otherwise as one batch of 2N).
    ``set_target(content=, style=)`` caches targets (content features of an image of
    x's size, Grams of a style image of any size; None keeps the current one); then
    ``forward(x)`` omits y. ``set_style_target(y)`` is ``set_target(style=y)``.
    """

    def __init__(self, spec: FeatureSpec, loss: LossConfig | None = None, *,
                 weights: Weights | None = None) -> None:
        super().__init__()
        self.loss = loss if loss is not None else LossConfig.default_for(spec)
        self.loss.check_against(spec)
        self.features = TorchFeatures(spec, weights=weights)
        self.spec = spec
        self._content_target: dict[str, torch.Tensor] | None = None
        self._style_target: dict[str, torch.Tensor] | None = None
        self.eval()

    def set_target(self, content: torch.Tensor | None = None, style: torch.Tensor | None = None) -> None:
        """Cache targets for ``forward(x)``: images (1, 3, H, W) in the input range.

        content: x is compared with its features at the content layers (x must have
        its size); style: x's Grams with its Grams. None keeps the current one.
        """
        if content is None and style is None:
            raise InputError("set_target() got neither content nor style; give an image (1, 3, H, W) "
                             "for at least one of them.")
        new_content, new_style = self._content_target, self._style_target
        with torch.no_grad():
            if content is not None:
                fc = self.features.extract(self._target_image(content, "content", self.loss.content))
                new_content = {n: fc[n].detach() for n in self.loss.content}
            if style is not None:
                fs = self.features.extract(self._target_image(style, "style", self.loss.style))
                new_style = {k: v.detach() for k, v in losses.style_grams(fs, self.loss).items()}
        self._content_target, self._style_target = new_content, new_style

    def set_style_target(self, y: torch.Tensor) -> None:
        """Cache the Grams of y (1, 3, H, W): ``set_target(style=y)``."""
        self.set_target(style=y)

    def _target_image(self, image: torch.Tensor, what: str, terms: Mapping[str, float]) -> torch.Tensor:
        if not terms:
            raise InputError(f"this loss has no {what} terms, so it takes no {what} target "
                             f"(loss {self.loss.to_dict()}); drop {what}= or add {what} terms.")
        check_tensor(image, f"{what} target", self.spec)
        if image.shape[0] != 1:
            raise InputError(f"the {what} target has batch {image.shape[0]}; accepted: one image, "
                             "shape (1, 3, H, W). Pass target[None] or target[:1].")
        return image

    def terms(self, fx: Mapping[str, torch.Tensor], fy: Mapping[str, torch.Tensor] | None,
              style_target: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return losses.distance_terms(fx, fy, self.loss, style_target=style_target)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if y is None:
            check_tensor(x, "x", self.spec)
            content, style = self._content_target, self._style_target
            if (self.loss.content and content is None) or (self.loss.style and style is None):
                raise_missing_y(bool(self.loss.content and content is None),
                                bool(self.loss.style and style is None))
            fx = self.features.extract(x)
            for name, t in (content or {}).items():
                if fx[name].shape[2:] != t.shape[2:]:
                    raise InputError(
                        f"x is {x.shape[2]}x{x.shape[3]}, so its {name} features are "
                        f"{tuple(fx[name].shape[2:])}, but the content target's are {tuple(t.shape[2:])}; "
                        "set the target from an image of x's size: set_target(content=image).")
            return self.terms(fx, content, style)
        check_pair(x, y, self.spec)
        if torch.is_grad_enabled() and not y.requires_grad:
            # Two batches, y's without a graph: the backward then runs on N images, not 2N.
            fx = self.features.extract(x)
            with torch.no_grad():
                fy = self.features.extract(y)
            return self.terms(fx, fy)
        return self.terms(*self.features.extract_pair(x, y))


def raise_missing_y(no_content: bool, no_style: bool) -> None:
    what = " and ".join(w for w, miss in (("content", no_content), ("style", no_style)) if miss)
    raise InputError(
        f"y was not given and no {what} target is set. Pass y, or call "
        f"set_target({', '.join(f'{w}=image' for w in what.split(' and '))}) first."
    )


def __getattr__(name: str) -> object:
    """``reference.TorchLPIPS``, the name's path before it moved into the lpips package
    (``perceptual_engine.lpips.TorchLPIPS``): still importable from here."""
    if name == "TorchLPIPS":
        from .lpips.reference import TorchLPIPS

        return TorchLPIPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
