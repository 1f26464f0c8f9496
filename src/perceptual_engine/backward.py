"""Hand-written vector-Jacobian products, one per op kind, and the network's backward.

torch.onnx cannot export ``torch.autograd`` (nor ``torch.func.vjp``), so the
gradient of the loss with respect to the input image is written out here as
plain torch ops. They run eagerly (tests compare each with autograd) and are
traced into ONNX like any other torch code by the exporter.

Each ``*_vjp(g, ...)`` maps the gradient ``g`` of a scalar L with respect to an
op's output to the gradient with respect to its input. Weights get no gradient.

Max pooling: the gradient goes to the window's first maximum in scan order
((0,0), (0,1), (1,0), (1,1)), found by an equality mask against the pooled
output, so tied maxima never double-count and the winner is the one PyTorch's
CPU kernel picks. Rows and columns that the floor of an odd side drops get zero,
as in every pooling VJP here.

float16 networks: the seed gradients (float32) are scaled per sample by a power
of two that brings their largest magnitude into [1, 2) before the cast to half,
so small gradients do not flush to zero; the input gradient is unscaled in float32.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .reference import L2Pool
from .spec import LossConfig

Tensor = torch.Tensor


# -- one VJP per op kind --------------------------------------------------------------------
def normalize_vjp(g: Tensor, scale: Tensor) -> Tensor:
    """x·scale + shift (per channel): g·scale."""
    return g * scale


def conv_vjp(g: Tensor, conv: nn.Conv2d) -> Tensor:
    """3×3 conv, stride 1, padding 1: an ordinary Conv of g with the weights transposed
    in/out and flipped 3×3, padding 1 (equal to ConvTranspose with the same weights).

    Why not ConvTranspose: ONNX Runtime's CPU Conv is faster than its ConvTranspose for
    these shapes (docs/openvino.md), and OpenVINO's CPU plugin gave a wrong ConvTranspose
    where its weight tensor is also a forward Conv's weight of square shape (C_in = C_out);
    the flipped copy is a constant of its own, folded at export.
    """
    return F.conv2d(g, flipped_weight(conv.weight), padding=conv.padding)


def flipped_weight(w: Tensor) -> Tensor:
    """(C_out, C_in, kh, kw) -> (C_in, C_out, kh, kw), flipped in both spatial axes."""
    return w.transpose(0, 1).flip(2, 3)


def relu_vjp(g: Tensor, out: Tensor) -> Tensor:
    """max(x, 0), from its output: g where out > 0, else 0."""
    return g * (out > 0).to(g.dtype)


# No integer arithmetic on sizes below (no 2·Ho, no H − 2·Ho): exported, such sizes
# become int64 Mul/Sub nodes that the CUDA provider computed wrong (export/shapes.py).
# Constant slices and the sizes of existing tensors give the same crops and pads.
def _unpool(g: Tensor, like: Tensor) -> Tensor:
    # (N, C, Ho, 2, Wo, 2) -> (N, C, 2·Ho, 2·Wo), zero-padded to like's H, W (floored rows/cols):
    # one zero row and column always, then cut to like's sides (2·Ho <= H <= 2·Ho + 1).
    g = g.flatten(4, 5).flatten(2, 3)
    return F.pad(g, (0, 1, 0, 1))[:, :, : like.shape[2], : like.shape[3]]


def _windows(t: Tensor, out: Tensor) -> Tensor:
    # The 2×2 windows of t that produced out: (N, C, Ho, 2, Wo, 2). Rows 0:-1:2 and 1::2
    # are the windows' first and second rows whether the side is even or odd (a floored
    # odd side's last row is in neither).
    rows = [t[:, :, 0:-1:2], t[:, :, 1::2]]
    quads = [[r[:, :, :, 0:-1:2], r[:, :, :, 1::2]] for r in rows]
    return torch.stack([torch.stack(q, -1) for q in quads], 3)


def avg_pool_vjp(g: Tensor, inp: Tensor) -> Tensor:
    """2×2 average pool, stride 2: g/4 to each of the window's four inputs."""
    quarter = (g * 0.25)[:, :, :, None, :, None]
    return _unpool(quarter.expand(-1, -1, -1, 2, -1, 2), inp)


def max_pool_vjp(g: Tensor, inp: Tensor, out: Tensor) -> Tensor:
    """2×2 max pool, stride 2: g to the window's first maximum (see the module docstring)."""
    eq = _windows(inp, out) == out[:, :, :, None, :, None]
    e00, e01 = eq[:, :, :, 0, :, 0], eq[:, :, :, 0, :, 1]
    e10, e11 = eq[:, :, :, 1, :, 0], eq[:, :, :, 1, :, 1]
    f01 = e01 & ~e00
    f10 = e10 & ~(e00 | e01)
    f11 = e11 & ~(e00 | e01 | e10)
    first = torch.stack([torch.stack([e00, f01], -1), torch.stack([f10, f11], -1)], 3)
    return _unpool(g[:, :, :, None, :, None] * first.to(g.dtype), inp)


def l2_pool_vjp(g: Tensor, inp: Tensor, out: Tensor, filt: Tensor) -> Tensor:
    """y = sqrt(conv(x², f, stride 2, padding 1, per channel) + eps): x · convᵀ(g / y), float32.

    ∂y/∂s = 1/(2y) and ∂s/∂x = 2x·f, so the 2s cancel. y >= sqrt(eps) > 0: finite
    even where a window is all zero (x = 0 there too). The transposed convolution
    without padding gives 2·Ho + 1 rows; rows 1..H are the input's (padding 1).
    """
    x, y = inp.float(), out.float()
    back = F.conv_transpose2d(g.float() / y, filt.float(), stride=2, groups=x.shape[1])
    back = back[:, :, 1:, 1:][:, :, : x.shape[2], : x.shape[3]]  # no 1 + H: see _unpool
    return (x * back).to(g.dtype)


# Spatial statistics of (N, C, h, w) maps, per sample and channel -> (N, C); their VJPs
# take the gradient (N, C) of the statistic and return one of the map's shape (the
# mean's broadcasts from (N, C, 1, 1)), float32.
def mean_vjp(g: Tensor, a: Tensor) -> Tensor:
    """μ = mean over h, w of a: g / (h·w) everywhere, as (N, C, 1, 1) that broadcasts
    against the map (an Expand to a's shape would export its target as int64 arithmetic
    on the input's sides: see _unpool)."""
    return (g.float() / _area(a))[:, :, None, None]


def variance_vjp(g: Tensor, a: Tensor) -> Tensor:
    """σ² = mean over h, w of (a − μ)²: g · 2 (a − μ) / (h·w) (μ's own term sums to zero).
    A covariance is a difference of variances here (σa² + σb² − 2σab = var(a − b)), so
    DISTS' structure term needs no VJP of its own."""
    a = a.float()
    return (2.0 * g.float() / _area(a))[:, :, None, None] * (a - a.mean(dim=(2, 3), keepdim=True))


def _area(a: Tensor) -> Tensor:
    """h·w of an (N, C, h, w) map as a float32 scalar, one axis at a time (no int64 product)."""
    return losses.axis_size(a, 2) * losses.axis_size(a, 3)


def ratio_vjp(g: Tensor, num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """r = num / den: (g / den, −g · num / den²) for num and den."""
    q = g / den
    return q, -q * num / den


def content_vjp(fx: Tensor, target: Tensor, seed: Tensor) -> Tensor:
    """content = mean over c, h, w of (fx − target)²: seed_n · 2 (fx − target) / (C·H·W), float32."""
    d = fx.float() - target.float()
    # Divided axis by axis: a C·H·W count would overflow a float16 build (inf -> 0).
    scaled = d * (2.0 * seed.view(-1, 1, 1, 1) / losses.axis_size(d, 1))
    return scaled / losses.axis_size(d, 2) / losses.axis_size(d, 3)


def style_vjp(fx: Tensor, target_gram: Tensor, norm: str, seed: Tensor) -> Tensor:
    """style = mean over i, j of (G − T)², G = (F/√n)(F/√n)ᵀ:
    seed_n · 4 / C² · (G − T)(F/√n) / √n, reshaped to fx's shape, float32."""
    flat = losses.scaled_flat(fx, norm)  # (N, C, HW)
    diff = torch.bmm(flat, flat.transpose(1, 2)) - target_gram
    c = fx.shape[1]
    d = torch.bmm(diff, flat) * (seed.view(-1, 1, 1) * (4.0 / (c * c)))
    factor = losses.gram_factor(fx, norm)
    if factor is not None:
        d = d * factor
    return d.view(fx.shape)


def terms_vjp(fx: Mapping[str, Tensor], loss: LossConfig, seed: Tensor, *,
              content: Mapping[str, Tensor] | None = None,
              style: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{layer: ∂L/∂F_l} float32 for L = Σ_n seed_n · total_n (losses.weighted_total).

    content: target features per content layer ((N or 1, C, H, W), broadcast);
    style: target Grams per style layer ((N or 1, C, C)). Targets get no gradient.
    """
    grads: dict[str, Tensor] = {}
    for name, w in loss.content.items():
        if content is None:
            raise ValueError("content terms need a content target")
        grads[name] = content_vjp(fx[name], content[name], seed * w)
    for name, w in loss.style.items():
        if style is None:
            raise ValueError("style terms need a style target")
        g = style_vjp(fx[name], style[name], loss.gram, seed * w)
        grads[name] = grads[name] + g if name in grads else g
    return grads


# -- the network ----------------------------------------------------------------------------
def features_and_vjp(features, x: Tensor) -> tuple[dict[str, Tensor], Callable[[Mapping[str, Tensor]], Tensor]]:
    """The tapped features of x (as ``features.extract(x)``) and their VJP.

    features: a ``TorchFeatures``; x: (N, 3, H, W) float32.
    Returns ``(feats, vjp)``: ``vjp({layer: ∂L/∂F_layer})`` (any subset of the spec's
    layers, any float dtype) is ∂L/∂x, (N, 3, H, W) float32. The gradients are cast
    to the network's dtype; a float16 caller scales them first (see ``loss_and_grad``).
    """
    body = features.body
    dtype = body[0].weight.dtype
    h = features.normalize(x)
    if h.dtype != dtype:
        h = h.to(dtype)
    acts = [h]  # acts[i] is the input of body[i]; acts[i + 1] its output
    found: dict[str, Tensor] = {}
    taps = features._taps
    for i, mod in enumerate(body):
        h = mod(h)
        acts.append(h)
        if i in taps:
            found[taps[i]] = h
    feats = {name: found[name] for name in features.spec.layers}
    index = {name: i for i, name in taps.items()}

    def vjp(grads: Mapping[str, Tensor]) -> Tensor:
        unknown = [k for k in grads if k not in index]
        if unknown:
            raise ValueError(f"no tapped layer named {unknown}; tapped: {list(index)}")
        if not grads:
            return torch.zeros_like(x, dtype=torch.float32)
        g = None
        for i in range(max(index[k] for k in grads), -1, -1):
            name = taps.get(i)
            if name in grads:
                add = grads[name].to(dtype)
                g = add if g is None else g + add
            if g is None:
                continue
            g = _module_vjp(body[i], g, acts[i], acts[i + 1])
        return normalize_vjp(g.float(), features.normalize.scale)

    return feats, vjp


def _module_vjp(mod: nn.Module, g: Tensor, inp: Tensor, out: Tensor) -> Tensor:
    if isinstance(mod, nn.Conv2d):
        return conv_vjp(g, mod)
    if isinstance(mod, nn.ReLU):
        return relu_vjp(g, out)
    if isinstance(mod, nn.MaxPool2d):
        return max_pool_vjp(g, inp, out)
    if isinstance(mod, nn.AvgPool2d):
        return avg_pool_vjp(g, inp)
    if isinstance(mod, L2Pool):
        return l2_pool_vjp(g, inp, out, mod.filter)
    raise TypeError(f"no VJP for {type(mod).__name__}")


def loss_scale(grads: Mapping[str, Tensor]) -> Tensor:
    """Per-sample power of two (N, 1, 1, 1) that brings max |grad| into [1, 2), float32.

    All-zero gradients get 2^100 (still zero after scaling, finite in float32)."""
    peak = torch.stack([g.abs().flatten(1).amax(1) for g in grads.values()], 0).amax(0)
    peak = peak.clamp_min(2.0 ** -100)
    return torch.exp2(-torch.floor(torch.log2(peak))).view(-1, 1, 1, 1)


def loss_and_grad(features, loss: LossConfig, x: Tensor, *,
                  content: Mapping[str, Tensor] | None = None,
                  style: Mapping[str, Tensor] | None = None,
                  seed: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """x's features, the terms of ``losses.distance_terms`` for x against the targets,
    and ∂(Σ_n seed_n · total_n)/∂x (N, 3, H, W) float32 (seed defaults to ones).

    content: target features {layer: (N or 1, C, H, W)}; style: target Grams
    {layer: (N or 1, C, C)}. float16 networks backpropagate a loss-scaled seed.
    """
    feats, vjp = features_and_vjp(features, x)
    terms = losses.distance_terms(feats, content, loss, style_target=style)
    if seed is None:
        seed = torch.ones_like(terms["total"])
    grads = terms_vjp(feats, loss, seed, content=content, style=style)
    if features.body[0].weight.dtype == torch.float32:
        return feats, terms, vjp(grads)
    scale = loss_scale(grads)
    scaled = {k: g * scale.view((-1,) + (1,) * (g.dim() - 1)) for k, g in grads.items()}
    return feats, terms, vjp(scaled) / scale
