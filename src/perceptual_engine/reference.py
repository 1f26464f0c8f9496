"""The PyTorch reference: TorchFeatures and TorchPerceptualLoss.

The same modules are what the exporter traces, so the ONNX graphs and the
reference share one network definition and one set of formulas (losses.py).
ReLUs are out-of-place here: torchvision's in-place ReLUs would overwrite a
tapped conv output.
"""
from __future__ import annotations

import dataclasses

from typing import Mapping

import torch
from torch import nn

from . import layers as _layers, trunks as _trunks
from . import losses
from . import lpips as _lpips
from .errors import InputError
from .spec import INPUT_RANGES, FeatureSpec, LossConfig
from .validate import check_pair, check_tensor
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


def l2_filter() -> torch.Tensor:
    """DISTS' L2-pooling window: outer(h, h) / sum, h = hanning(5)[1:-1] = (0.5, 1, 0.5), (3, 3)."""
    h = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    g = h[:, None] * h[None, :]
    return (g / g.sum()).to(torch.float32)


class L2Pool(nn.Module):
    """sqrt(conv2d(x², g, stride 2, padding 1, per channel) + 1e-12) (DISTS' L2 pooling).

    float32 (and float64): exactly that, x² as one Pow. float16: in float16, on x/16
    (``prescale``), so a square stays finite for |x| < 4096 (x² itself overflows above
    256): 16·sqrt(max(conv((x/16)², g), 2⁻²⁴)). Squares of |x| < 2⁻⁸ round to zero or a
    few subnormal bits, so the result is only good to about 2⁻⁸ absolute; the floor at
    the smallest float16 value (a result of at least 2⁻⁸, where float32 gives 1e-6 for an
    all-zero window) keeps the VJP's x·g/y bounded where the squares underflow (with y
    at 1e-6 there it was off by a factor of 80 on a VGG16 with activations near 1).
    ``prescale`` and ``pool_prescaled`` are the two halves of ``forward``, apart so that
    DISTS' statistics can reuse x/16 (dists.py).
    """

    EPS = 1e-12
    HALF_SCALE = 2.0 ** -4
    HALF_FLOOR = 2.0 ** -24  # the smallest positive float16

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filter", l2_filter().expand(channels, 1, 3, 3).contiguous(), persistent=False)
        # A 1-element tensor, not a scalar: the ONNX exporter's optimizer (onnxscript's
        # add_0 rule, abs_tol 1e-8) drops an Add of a scalar 1e-12 as if it were 0, and
        # sqrt(0) then puts inf into the VJP's 1/y. It leaves 1-D constants alone.
        self.register_buffer("eps", torch.full((1,), self.EPS, dtype=torch.float32), persistent=False)

    @classmethod
    def scale(cls, dtype: torch.dtype) -> float:
        """The factor ``prescale`` multiplies by in ``dtype``: 1/16 for float16, else 1."""
        return cls.HALF_SCALE if dtype == torch.float16 else 1.0

    def prescale(self, x: torch.Tensor) -> torch.Tensor:
        """x times ``scale(x.dtype)`` (x itself outside float16)."""
        k = self.scale(x.dtype)
        return x if k == 1.0 else x * k

    def _sums(self, u: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(u ** 2, self.filter.to(u.dtype), stride=2, padding=1,
                                          groups=u.shape[1])

    def root_prescaled(self, u: torch.Tensor) -> torch.Tensor:
        """sqrt(conv(u², g, ...)) in u's dtype, with no eps or floor: k times the pooled x
        for u = ``prescale(x)``, but where a window is all zero (0 there)."""
        return torch.sqrt(self._sums(u))

    def pool_prescaled(self, u: torch.Tensor) -> torch.Tensor:
        """The pooled x from u = ``prescale(x)``, in u's dtype."""
        k = self.scale(u.dtype)
        if k == 1.0:
            return torch.sqrt(self._sums(u) + self.eps.to(u.dtype))
        return torch.sqrt(torch.clamp_min(self._sums(u), self.HALF_FLOOR)) * (1.0 / k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_prescaled(self.prescale(x))


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


class TorchLPIPS(nn.Module):
    """LPIPS (lpips v0.1; VGG16, AlexNet or SqueezeNet 1.1) on the reference network:
    ``forward(x, y) -> {"lpips.<l>": (N,), "total": (N,)[, "spatial": (N, 1, H, W)]}``, float32.

    spec: a net's trunk at its taps (see ``lpips.default_spec(weights, net=...)``); its
        input range is the images' ("-1,1" as lpips, "0,1" as its normalize=True).
    lpips_weights: LinearWeights of the spec's net, a .pth path, or None for the lpips
        package's file of that net.
    spatial: also return the per-pixel map, as lpips' spatial=True.
    Differentiable by autograd (NaN where a feature vector is exactly zero, as lpips).
    """

    def __init__(self, spec: FeatureSpec, lpips_weights: "_lpips.LinearWeights | str | None" = None,
                 *, spatial: bool = False, weights: Weights | None = None) -> None:
        super().__init__()
        _lpips.check_spec(spec)
        self.spec, self.spatial = spec, spatial
        lin = _lpips.resolve_weights(lpips_weights, spec)
        self._lin = lin
        for i, w in enumerate(lin.weights):  # buffers: .to(device) moves them with the network
            self.register_buffer(f"lin{i}", w.clone(), persistent=False)
        self.features = TorchFeatures(spec, weights=weights)

    @property
    def lin(self) -> "_lpips.LinearWeights":
        """The linear weights, on the module's device."""
        weights = tuple(getattr(self, f"lin{i}") for i in range(len(self._lin.weights)))
        return dataclasses.replace(self._lin, weights=weights)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Without input validation (the exporter traces this)."""
        fx, fy = self.features.extract_pair(x, y)
        return _lpips.head(fx, fy, self.lin, size=tuple(x.shape[2:]) if self.spatial else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(x, y, self.spec)
        return self.terms(x, y)


def raise_missing_y(no_content: bool, no_style: bool) -> None:
    what = " and ".join(w for w, miss in (("content", no_content), ("style", no_style)) if miss)
    raise InputError(
        f"y was not given and no {what} target is set. Pass y, or call "
        f"set_target({', '.join(f'{w}=image' for w in what.split(' and '))}) first."
    )
