"""Hand-written vector-Jacobian products, one per op kind, and the network's backward.

torch.onnx cannot export ``torch.autograd`` (nor ``torch.func.vjp``), so the
gradient of the loss with respect to the input image is written out here as
plain torch ops. They run eagerly (tests compare each with autograd) and are
traced into ONNX like any other torch code by the exporter.

Each ``*_vjp(g, ...)`` maps the gradient ``g`` of a scalar L with respect to an
op's output to the gradient with respect to its input. Weights get no gradient.

The exported gradient graphs are memory-bound glue around the convolutions, so the
network's backward runs in the network's dtype with as few full-size passes as it can:
a ReLU is one Where on its output, a max pool's gradient goes through one code
tensor and a MaxPool of it (``max_pool_vjp``), the flipped convolution weights are
constants of the graph, and the seed gradients of the loss terms are made in the
network's dtype with every scalar factor (the loss scale included) folded into their
small coefficients (``content_vjp``, ``style_vjp``).

Max pooling: the gradient goes to the window's first maximum in scan order
((0,0), (0,1), (1,0), (1,1)), the one PyTorch's kernels pick, so tied maxima never
double-count. Rows and columns that the floor of an odd side drops get zero, as in
every pooling VJP here. Overlapping windows (AlexNet's and SqueezeNet's 3×3, stride 2)
and ceil_mode windows over the edge take the same rank codes one window offset at a
time, summed where windows overlap (``window_max_pool_vjp``): elementwise ops, Slices
and Pads, no indices and no scatter.

Convolutions: stride 1 is a Conv with flipped weights; a strided one (AlexNet's and
SqueezeNet's first) a ConvTranspose, padded and cut to the input's size (``conv_vjp``).
torchvision's SqueezeNet Fire modules are differentiated whole (``fire_vjp``), with the
squeeze activation that ``features_and_vjp``'s forward keeps.

float16 networks: the seed gradients are scaled by a per-sample power of two
estimated from the loss terms and the Grams (``seed_scale``: scalar work only, no
reduction over the gradients), so that neither they nor the gradients backpropagated
from them leave float16's range; the input gradient is unscaled in float32.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .trunks.modules import L2Pool
from .spec import LossConfig

Tensor = torch.Tensor


# -- one VJP per op kind --------------------------------------------------------------------
def normalize_vjp(g: Tensor, scale: Tensor) -> Tensor:
    """x·scale + shift (per channel): g·scale."""
    return g * scale


def conv_vjp(g: Tensor, conv: nn.Conv2d, flipped: Tensor | None = None, inp: Tensor | None = None) -> Tensor:
    """Any Conv2d without dilation or groups, by its stride.

    Stride 1 (padding p <= k − 1): an ordinary Conv of g with the weights transposed
    in/out and flipped, padding k − 1 − p (VGG's 3×3, padding 1: padding 1; equal to
    ConvTranspose with the same weights).

    Why not ConvTranspose there: ONNX Runtime's CPU Conv is faster than its ConvTranspose for
    these shapes (docs/openvino.md), and OpenVINO's CPU plugin gave a wrong ConvTranspose
    where its weight tensor is also a forward Conv's weight of square shape (C_in = C_out);
    the flipped copy is a constant of its own. ``flipped``: that copy, precomputed
    (``features_and_vjp`` passes a constant, so the exported graph holds an initializer
    rather than a Transpose and Slice of the forward weight on every call).

    Stride s > 1 (AlexNet's 11×11 stride 4, SqueezeNet's 3×3 stride 2): ``_strided_conv_vjp``,
    a ConvTranspose whose weight is the forward's, as is (``backward_weight``; ``flipped``
    is then that copy); it needs ``inp`` for the input's size.
    """
    w = flipped if flipped is not None else backward_weight(conv, conv.weight)
    if _as_conv(conv):
        (kh, kw), (ph, pw) = conv.kernel_size, _conv_padding(conv)
        return F.conv2d(g, w, padding=(kh - 1 - ph, kw - 1 - pw))
    if inp is None:
        raise ValueError(f"the VJP of a strided convolution ({conv}) needs its input (inp) for the input's size")
    return _strided_conv_vjp(g, w, conv.stride, _conv_padding(conv), inp)


def _strided_conv_vjp(g: Tensor, w: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                      inp: Tensor) -> Tensor:
    """ConvTranspose of g, stride s, no padding: row q of the zero-padded input (q − p of
    inp's). It has (Ho − 1)·s + k rows = H + 2p − r, r = (H + 2p − k) mod s < s the rows
    the forward's floor dropped: padded with s − 1 − p zero rows (when p < s − 1, so that
    H rows are left after the p padding rows at the top), cut from row p to inp's H. A
    ConvTranspose with pads p would cut the last p rows, real rows when r < p. Constant
    pads and slices to inp's sides: no size is computed (see _unpool)."""
    (sh, sw), (ph, pw) = stride, padding
    back = F.conv_transpose2d(g, w, stride=(sh, sw))
    extra_h, extra_w = max(0, sh - 1 - ph), max(0, sw - 1 - pw)
    if extra_h or extra_w:
        back = F.pad(back, (0, extra_w, 0, extra_h))
    return back[:, :, ph:, pw:][:, :, : inp.shape[2], : inp.shape[3]]


def flipped_weight(w: Tensor) -> Tensor:
    """(C_out, C_in, kh, kw) -> (C_in, C_out, kh, kw), flipped in both spatial axes."""
    return w.transpose(0, 1).flip(2, 3)


def backward_weight(conv: nn.Conv2d, w: Tensor) -> Tensor:
    """The weight of conv's VJP, from w (conv's weight or a copy): flipped for the
    stride-1 Conv, w itself for the ConvTranspose of a strided one (conv_vjp)."""
    return flipped_weight(w) if _as_conv(conv) else w


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv's padding as (ph, pw); a ValueError for what conv_vjp does not differentiate."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_vjp needs an nn.Conv2d, got {type(conv).__name__}")
    if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"conv_vjp supports dilation 1, groups 1 and zero padding only, got {conv}")
    pad = conv.padding
    if pad == "valid":
        return 0, 0
    if pad == "same":  # stride 1 only (nn.Conv2d's rule); symmetric for odd kernels only
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"conv_vjp: padding='same' with an even kernel pads unevenly, got {conv}")
        return (conv.kernel_size[0] - 1) // 2, (conv.kernel_size[1] - 1) // 2
    return int(pad[0]), int(pad[1])


def _as_conv(conv: nn.Conv2d) -> bool:
    """Whether conv's VJP is an ordinary Conv (stride 1, padding <= k − 1), not a ConvTranspose."""
    pad = _conv_padding(conv)
    return conv.stride == (1, 1) and all(p <= k - 1 for p, k in zip(pad, conv.kernel_size))


def relu_vjp(g: Tensor, out: Tensor) -> Tensor:
    """max(x, 0), from its output: g where out > 0, else 0, in g's dtype.

    out >= 0, so out > 0 is out != 0: a Cast to bool and a Where. (A comparison of
    float16 tensors exports with Casts of both sides to float32.)"""
    return torch.where(out.bool(), g, 0)


# No integer arithmetic on sizes below (no 2·Ho, no H − 2·Ho): exported, such sizes
# become int64 Mul/Sub nodes that the CUDA provider computed wrong (export/shapes.py).
# Constant slices and the sizes of existing tensors give the same crops and pads.
def _unpool(g: Tensor, like: Tensor) -> Tensor:
    # (N, C, Ho', 2, Wo', 2) -> (N, C, 2·Ho', 2·Wo'), cut to like's H, W. Ho' = Ho + 1 (g
    # padded with one zero row and column at the pooled size): 2·Ho <= H <= 2·Ho + 1, so
    # the grid covers a floored odd side, and the cut keeps H rows whatever the parity.
    g = g.flatten(4, 5).flatten(2, 3)
    return g[:, :, : like.shape[2], : like.shape[3]]


def avg_pool_vjp(g: Tensor, inp: Tensor) -> Tensor:
    """2×2 average pool, stride 2: g/4 to each of the window's four inputs."""
    quarter = F.pad(g * 0.25, (0, 1, 0, 1))[:, :, :, None, :, None]
    return _unpool(quarter.expand(-1, -1, -1, 2, -1, 2), inp)


# Rank of each position of a 2×2 window in scan order, the first highest (max_pool_vjp).
_RANKS = ((4.0, 3.0), (2.0, 1.0))


def max_pool_vjp(g: Tensor, inp: Tensor, out: Tensor, kernel_size: int | tuple[int, int] = 2,
                 stride: int | tuple[int, int] | None = None, ceil_mode: bool = False) -> Tensor:
    """2×2 max pool, stride 2: g to the window's first maximum in scan order. Other
    windows (no padding, no dilation): ``window_max_pool_vjp``.

    Each window position holding the maximum gets its rank (4, 3, 2, 1 in scan order),
    the others 0; a 2×2 MaxPool of these codes is the rank of the first maximum, and
    the gradient goes where a position's rank equals it. Two full-size passes (the
    code, the gradient) in the input's dtype, no index arithmetic, exactly PyTorch's
    tie rule (the strictly-greater scan of its kernels keeps the first maximum).

    Equality is tested as a difference of zero (a Cast of a − b to bool is a != b):
    the difference of two distinct float16 numbers is a nonzero multiple of 2^-24,
    so this is exact, and it stays in the input's dtype where ``==`` would export
    with Casts of both sides to float32.
    """
    kernel = _pair(kernel_size)
    step = _pair(stride) if stride is not None else kernel
    if (kernel, step, ceil_mode) != ((2, 2), (2, 2), False):
        return window_max_pool_vjp(g, inp, out, kernel, step, ceil_mode)
    n, c, ho, wo = out.shape
    ranks = torch.tensor(_RANKS, dtype=inp.dtype, device=inp.device).view(1, 1, 1, 2, 1, 2)
    # The ranks tiled over the windows, (1, 1, 2·Ho, 2·Wo), made before the crop: exported,
    # the crop's ends are read from its shape (no 2·Ho computed, export/shapes.py).
    tiles = (ranks + torch.zeros_like(out[:1, :1, :, None, :, None])).flatten(4, 5).flatten(2, 3)
    win = inp[:, :, : tiles.shape[2], : tiles.shape[3]].reshape(n, c, ho, 2, wo, 2)
    diff = (win - out[:, :, :, None, :, None]).flatten(4, 5).flatten(2, 3)
    code = torch.where(diff.bool(), 0, tiles)
    first = F.max_pool2d(code, 2, 2)
    first, g = F.pad(first, (0, 1, 0, 1)), F.pad(g, (0, 1, 0, 1))  # rank 0 there: no gradient
    back = torch.where((ranks - first[:, :, :, None, :, None]).bool(), 0, g[:, :, :, None, :, None])
    return _unpool(back, inp)


def window_max_pool_vjp(g: Tensor, inp: Tensor, out: Tensor, kernel: tuple[int, int],
                        stride: tuple[int, int], ceil_mode: bool = False) -> Tensor:
    """k×k max pool, stride s, no padding: windows that may overlap (AlexNet's and
    SqueezeNet's 3×3, stride 2) and, with ceil_mode, hang over the bottom and right
    edges. g goes to each window's first maximum in scan order, summed over the windows
    an input belongs to: PyTorch's gradient, ties included.

    max_pool_vjp's rank codes, one window offset (a, b) at a time: offset (a, b) of every
    window is the strided slice inp[a::s, b::s] cut to the pooled size; it gets its rank
    (k² for (0, 0) down to 1 in scan order) where it equals the window's maximum (the Max
    of the k² slices), else 0; the largest code is the first maximum's rank; offset (a, b)
    passes g where its rank is that. Its share lands on rows s·i + a: the offsets with
    a ≡ p (mod s) sum on row p of each stride, a // s windows down (a Pad), and the
    s×s interleave of those sums is cut to inp's size (rows the floor drops get zero).
    A window hanging over the edge reads −inf there (a Pad of inp by s − 1, ceil_mode
    only), which never wins: every window starts inside inp, so its (0, 0) is real.

    Cost, 3×3 stride 2: per offset a strided Slice, a Max, Sub, Cast, Where and Max for
    the code and a Sub, Cast and Where for g, all at the pooled size (about a quarter of
    inp's), then 5 Adds and the interleave: some 170 ONNX nodes. On ONNX Runtime's CPU
    provider (one thread, a (1, 64, 111, 111) input, float32) it took about twice a
    64 -> 64 3×3 Conv at that size, and less than the 2×2 path on the same input. No
    indices and no scatter (MaxPool's Indices and ScatterElements' add did match on ONNX
    Runtime's and OpenVINO's CPUs): no runtime's index or tie rule, no atomics, nothing
    outside inp's dtype.
    """
    (kh, kw), (sh, sw) = kernel, stride
    x = F.pad(inp, (0, sw - 1, 0, sh - 1), value=float("-inf")) if ceil_mode else inp
    ho, wo = out.shape[2], out.shape[3]
    offsets = [(a, b) for a in range(kh) for b in range(kw)]
    ranks = {ab: torch.tensor(float(kh * kw - k), dtype=inp.dtype, device=inp.device)
             for k, ab in enumerate(offsets)}
    wins = {(a, b): x[:, :, a::sh, b::sw][:, :, :ho, :wo] for a, b in offsets}
    # The windows' maximum from the same slices, not out: ONNX Runtime's CPU provider runs a
    # float16 MaxPool in float32 and hands a float32 Sub its unrounded output, which then
    # matched none of the float16 window values (all gradients were lost).
    peak = functools.reduce(torch.maximum, wins.values())
    first = functools.reduce(torch.maximum, [torch.where((wins[ab] - peak).bool(), 0, ranks[ab]) for ab in offsets])
    # Each share padded to Ho + (k − 1) // s + 1 windows: the shift, and one more for the
    # rows that the floor drops (as _unpool).
    mh, mw = (kh - 1) // sh + 1, (kw - 1) // sw + 1
    sums: dict[tuple[int, int], Tensor] = {}
    for a, b in offsets:
        share = torch.where((ranks[a, b] - first).bool(), 0, g)
        share = F.pad(share, (b // sw, mw - b // sw, a // sh, mh - a // sh))
        key = (a % sh, b % sw)
        sums[key] = sums[key] + share if key in sums else share
    zero = torch.zeros_like(F.pad(g, (0, mw, 0, mh))) if len(sums) < sh * sw else None  # k < s: gaps
    rows = [torch.stack([sums.get((p, q), zero) for q in range(sw)], -1) for p in range(sh)]
    grid = torch.stack(rows, 3).flatten(4, 5).flatten(2, 3)  # (N, C, Ho', s, Wo', s) -> rows, cols
    return grid[:, :, : inp.shape[2], : inp.shape[3]]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


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


# torchvision's Fire's convolutions, in the order of fire_vjp's ``flipped``.
FIRE_CONVS = ("squeeze", "expand1x1", "expand3x3")


def fire_vjp(g: Tensor, fire: nn.Module, inp: Tensor, out: Tensor, squeezed: Tensor | None = None,
             flipped: tuple[Tensor | None, ...] | None = None) -> Tensor:
    """torchvision's SqueezeNet Fire: s = relu(squeeze(x)), out = cat(relu(expand1x1(s)),
    relu(expand3x3(s))) on channels.

    g masked by out's ReLUs, split on channels, through both expand convolutions (summed:
    both read s), masked by s's ReLU, through the squeeze convolution. squeezed: s as the
    forward made it (``features_and_vjp`` keeps it), else recomputed from inp.
    flipped: the three convolutions' backward weights (``FIRE_CONVS`` order), or None.
    """
    if squeezed is None:
        squeezed = torch.relu(fire.squeeze(inp))
    f_squeeze, f_1x1, f_3x3 = flipped if flipped is not None else (None, None, None)
    g = relu_vjp(g, out)
    c1 = fire.expand1x1.out_channels
    gs = (conv_vjp(g[:, :c1], fire.expand1x1, f_1x1, squeezed)
          + conv_vjp(g[:, c1:], fire.expand3x3, f_3x3, squeezed))
    return conv_vjp(relu_vjp(gs, squeezed), fire.squeeze, f_squeeze, inp)


def _is_fire(mod: nn.Module) -> bool:
    """Whether mod is torchvision's Fire (never imported here: a Fire in a network means
    its module is loaded already)."""
    squeezenet = sys.modules.get("torchvision.models.squeezenet")
    return squeezenet is not None and isinstance(mod, squeezenet.Fire)


def _fire_forward(fire: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Fire.forward, returning (out, s) so that the VJP has s without recomputing it."""
    s = fire.squeeze_activation(fire.squeeze(h))
    out = torch.cat([fire.expand1x1_activation(fire.expand1x1(s)),
                     fire.expand3x3_activation(fire.expand3x3(s))], 1)
    return out, s


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
    """h·w of an (N, C, h, w) map as a float32 scalar, one axis at a time (no int64 product;
    ``losses.axis_size``, shared with the Grams' in an exported graph)."""
    return losses.axis_size(a, 2) * losses.axis_size(a, 3)


def ratio_vjp(g: Tensor, num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """r = num / den: (g / den, −g · num / den²) for num and den."""
    q = g / den
    return q, -q * num / den


def content_vjp(fx: Tensor, target: Tensor, seed: Tensor) -> Tensor:
    """content = mean over c, h, w of (fx − target)²: seed_n · 2 (fx − target) / (C·H·W),
    in fx's dtype.

    One difference and one product over the feature: the per-sample factor (seed and
    count, float32; a float16 caller's seed carries the loss scale) is cast to fx's
    dtype first. With ``seed_scale`` it is at most 2^4, so float16 holds it to its
    relative precision; the difference of two float16 features is exact or rounded to
    its own relative precision.
    """
    coef = seed.float() * (2.0 / fx.shape[1]) / _area(fx)
    return (fx - target.to(fx.dtype)) * coef.to(fx.dtype).view(-1, 1, 1, 1)


def style_vjp(fx: Tensor, target_gram: Tensor, norm: str, seed: Tensor) -> Tensor:
    """style = mean over i, j of (G − T)², G = F Fᵀ / n: seed_n · 4 / (C² n) · (G − T) F,
    reshaped to fx's shape, in fx's dtype.

    G is ``losses.gram_fast`` (the forward's, shared in the exported graph). Every factor goes
    into the (N, C, C) matrix K = (G − T) · seed · 4 / (C² n), float32, cast to
    fx's dtype; the one full-size op is the product K F, whose float16 inputs a GPU
    accumulates in float32. No float32 copy of the feature.
    """
    c = fx.shape[1]
    k = (losses.gram_fast(fx, norm) - target_gram) * (seed.float().view(-1, 1, 1) * (4.0 / (c * c)))
    if norm == "chw":
        k = k / (c * _area(fx))
    elif norm == "hw":
        k = k / _area(fx)
    elif norm != "none":
        raise ValueError(f"unknown gram norm {norm!r}")
    return torch.bmm(k.to(fx.dtype), fx.flatten(2)).view(fx.shape)


def terms_vjp(fx: Mapping[str, Tensor], loss: LossConfig, seed: Tensor, *,
              content: Mapping[str, Tensor] | None = None,
              style: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{layer: ∂L/∂F_l} in the features' dtype for L = Σ_n seed_n · total_n
    (losses.weighted_total).

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

    features: a ``TorchFeatures``; x: (N, 3, H, W) float32. body's modules: Conv2d, ReLU
    (torchvision's in-place ones too, after a Conv: a Conv's VJP reads only its input's
    size), MaxPool2d, AvgPool2d, L2Pool and torchvision's Fire; while exporting, the
    backward weights are read from ``weights_info.state`` (``_flipped``).
    Returns ``(feats, vjp)``: ``vjp({layer: ∂L/∂F_layer}, scale=1.0)`` (any subset of
    the spec's layers, any float dtype) is ∂L/∂x / scale, (N, 3, H, W) float32. The
    gradients are cast to the network's dtype; a float16 caller scales them first (see
    ``loss_and_grad``) and passes that scale (a float or per sample (N,)), which is
    undone in float32 at the end, folded into the normalization's factor.
    """
    body = features.body
    dtype = body[0].weight.dtype
    h = features.normalize(x)
    if h.dtype != dtype:
        h = h.to(dtype)
    acts = [h]  # acts[i] is the input of body[i]; acts[i + 1] its output
    squeezed: dict[int, Tensor] = {}  # a Fire's squeeze activation, by index (fire_vjp)
    found: dict[str, Tensor] = {}
    taps = features._taps
    for i, mod in enumerate(body):
        if _is_fire(mod):
            h, squeezed[i] = _fire_forward(mod, h)
        else:
            h = mod(h)
        acts.append(h)
        if i in taps:
            found[taps[i]] = h
    feats = {name: found[name] for name in features.spec.layers}
    index = {name: i for i, name in taps.items()}

    def vjp(grads: Mapping[str, Tensor], scale: float | Tensor = 1.0) -> Tensor:
        unknown = [k for k in grads if k not in index]
        if unknown:
            raise ValueError(f"no tapped layer named {unknown}; tapped: {list(index)}")
        if not grads:
            return torch.zeros_like(x, dtype=torch.float32)
        g = None
        fused = False  # body[i]'s ReLU VJP was folded into the max pool above it
        for i in range(max(index[k] for k in grads), -1, -1):
            name = taps.get(i)
            if name in grads:
                add = grads[name].to(dtype)
                g = add if g is None else g + add
            if g is None:
                continue
            mod = body[i]
            if fused:
                fused = False
                continue
            if (isinstance(mod, nn.MaxPool2d) and i > 0 and isinstance(body[i - 1], nn.ReLU)
                    and taps.get(i - 1) not in grads):
                # The pool's input is the ReLU's output, and the pool's gradient lands only
                # on window maxima, where that output equals the pooled value: so the ReLU's
                # mask is out > 0 at the pooled size, applied before the pool's VJP. (So for
                # overlapping windows too: each window's share lands on its maximum.)
                g = _module_vjp(mod, relu_vjp(g, acts[i + 1]), acts[i], acts[i + 1])
                fused = True
                continue
            g = _module_vjp(mod, g, acts[i], acts[i + 1], _flipped(features, i, mod), squeezed.get(i))
        if isinstance(scale, Tensor):
            scale = scale.float().view(-1, 1, 1, 1)
        return normalize_vjp(g.float(), features.normalize.scale / scale)

    return feats, vjp


def _flipped(features, index: int, mod: nn.Module) -> Tensor | tuple[Tensor, ...] | None:
    """The backward weight (``backward_weight``) of body[index] as a constant if it is a
    convolution (state key ``features.{index}.weight``), the three of a Fire
    (``features.{index}.squeeze.weight``, ...: ``FIRE_CONVS``), else None."""
    if isinstance(mod, nn.Conv2d):
        return _constant_weight(features, f"features.{index}.weight", mod)
    if _is_fire(mod):
        return tuple(_constant_weight(features, f"features.{index}.{name}.weight", getattr(mod, name))
                     for name in FIRE_CONVS)
    return None


def _constant_weight(features, key: str, conv: nn.Conv2d) -> Tensor:
    """conv's backward weight, flipped or as is (``backward_weight``), as a constant.

    Eagerly that is made from the module's weight. While torch.export traces, the
    module's weight is a placeholder, and a flip of it would be exported as a Transpose
    and Slice of the weight (the ONNX constant folding stops at 8192 elements), so the
    flip is made outside the trace from the weights the network was built from
    (``weights_info``, the same tensors; ``key`` names one), and is exported as an
    initializer. The unflipped weight of a ConvTranspose is a copy too: a constant of its
    own, not the forward Conv's weight (see conv_vjp on OpenVINO).
    """
    w = conv.weight
    if not torch.compiler.is_exporting():
        return backward_weight(conv, w)
    state = getattr(getattr(features, "weights_info", None), "state", None) or {}
    real = state.get(key)
    if real is None or tuple(real.shape) != tuple(w.shape):
        return backward_weight(conv, w)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return backward_weight(conv, real.detach()).to(w.dtype, copy=True).contiguous()


def _module_vjp(mod: nn.Module, g: Tensor, inp: Tensor, out: Tensor,
                flipped: Tensor | tuple[Tensor, ...] | None = None, squeezed: Tensor | None = None) -> Tensor:
    """body's module mod: its VJP by type. flipped: ``_flipped``'s constants; squeezed: a
    Fire's squeeze activation (fire_vjp)."""
    if isinstance(mod, nn.Conv2d):
        return conv_vjp(g, mod, flipped, inp)
    if isinstance(mod, nn.ReLU):
        return relu_vjp(g, out)
    if isinstance(mod, nn.MaxPool2d):
        if _pair(mod.padding) != (0, 0) or _pair(mod.dilation) != (1, 1):
            raise ValueError(f"max_pool_vjp supports no padding and dilation 1 only, got {mod}")
        return max_pool_vjp(g, inp, out, mod.kernel_size, mod.stride, mod.ceil_mode)
    if isinstance(mod, nn.AvgPool2d):
        return avg_pool_vjp(g, inp)
    if isinstance(mod, L2Pool):
        return l2_pool_vjp(g, inp, out, mod.filter)
    if _is_fire(mod):
        return fire_vjp(g, mod, inp, out, squeezed, flipped)
    raise TypeError(f"no VJP for {type(mod).__name__}")


def loss_scale(grads: Mapping[str, Tensor]) -> Tensor:
    """Per-sample power of two (N, 1, 1, 1) that brings max |grad| into [1, 2), float32.

    All-zero gradients get 2^100 (still zero after scaling, finite in float32). The
    heads' backward (lpips/, dists/) uses it; the VGG losses use ``seed_scale``."""
    peak = torch.stack([g.abs().flatten(1).amax(1) for g in grads.values()], 0).amax(0)
    peak = peak.clamp_min(2.0 ** -100)
    return torch.exp2(-torch.floor(torch.log2(peak))).view(-1, 1, 1, 1)


# The loss scale of float16 networks (seed_scale).
PEAK = 8.0  # the largest |feature| (or feature difference) assumed per root mean square
_FLOOR = 2.0 ** -8  # the smallest root mean square the estimates use (keeps the scale finite)


def seed_scale(fx: Mapping[str, Tensor], loss: LossConfig, seed: Tensor, terms: Mapping[str, Tensor], *,
               style: Mapping[str, Tensor] | None = None) -> Tensor:
    """Per-sample power of two (N,) float32 that float16 networks scale their seed
    gradients by: it brings an estimate of the largest seed gradient to 2^-1.

    Estimated from what the forward already has, never from a pass over the gradients
    or the features: the content terms (mean of Δ², so RMS Δ) and the Grams (the
    diagonal is each channel's mean square, G − T gives the style gradient's matrix).
    For each term, the largest |∂L/∂F| is about
      content: 2 |w seed| · PEAK · RMS(Δ) / (C h w);
      style:   4 |w seed| / (C² n) · max_i Σ_j |G − T|_ij · PEAK · RMS(F) (n the Gram's norm),
    with PEAK = 8 for the largest element against the root mean square.

    Why this rather than one constant: the style gradient grows with the cube of the
    features' magnitude, which is a property of the weights and of the image. Measured
    on VGG19 to relu4_4 (random weights with features ~2 and weights x1.6 with features
    ~300), the largest style seed gradient for the same loss spans 2^26, more than a
    float16 scale can hold once the backward's gain (up to 2^8) is added. Against
    float16's range (largest finite 65504 ~ 2^16, smallest subnormal 2^-24): on those
    two networks and torchvision's initialization, at 64² and 224², every Gram norm,
    content and style alone and together, the largest seed gradient landed in
    2^-5.3..2^-0.1 (scales from 2^-21 to 2^39) and the largest gradient anywhere in the
    backward at or below 2^4. A feature 2^8 peakier than PEAK still leaves 2^4 of
    headroom, and small gradients keep ~18 powers of two above the subnormal floor.
    The scalar work is on (N,) and (N, C, C) tensors: no full-size pass.
    Zero terms (x = y) give the largest scale the floors allow; the coefficients stay
    finite in float16 (content: <= 2^4, style: (G − T) · scale <= 2^-1 / (PEAK · 2^-8)).
    """
    est = []
    seed = seed.float().abs()
    for name, w in loss.content.items():
        f = fx[name]
        rms = terms[f"content.{name}"].float().clamp_min(0.0).sqrt().clamp_min(_FLOOR)
        est.append(seed * (abs(w) * 2.0 * PEAK / f.shape[1]) * rms / _area(f))
    for name, w in loss.style.items():
        if style is None:
            raise ValueError("style terms need a style target")
        f = fx[name]
        c, area = f.shape[1], _area(f)
        g = losses.gram_fast(f, loss.gram)
        n = {"chw": c * area, "hw": area, "none": torch.ones_like(area)}[loss.gram]
        rows = (g - style[name]).abs().sum(2).amax(1)  # max_i Σ_j |G − T|_ij, (N,)
        mean_square = torch.diagonal(g, dim1=1, dim2=2).amax(1) * n / area
        rms = mean_square.clamp_min(0.0).sqrt().clamp_min(_FLOOR)
        est.append(seed * (abs(w) * 4.0 * PEAK / (c * c)) * rows * rms / n)
    peak = torch.stack(est, 0).amax(0).clamp(2.0 ** -100, 2.0 ** 100)
    return torch.exp2(-1.0 - torch.floor(torch.log2(peak)))


def _terms(fx: Mapping[str, Tensor], loss: LossConfig, content: Mapping[str, Tensor] | None,
           style: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``losses.distance_terms(fx, content, loss, style_target=style, fast=True)``, with
    each content difference taken in the features' dtype as ``content_vjp`` takes it (one
    difference for the term and its gradient in the exported graph, as ``losses.pair_terms``)
    and summed in float32 (a sum of squares), instead of two float32 copies and a float32
    difference of the whole feature."""
    out: dict[str, Tensor] = {}
    for name in loss.content:
        if content is None:
            raise ValueError("content terms need a content target")
        f = fx[name]
        d = (f - content[name].to(f.dtype)).float()
        out[f"content.{name}"] = (d * d).sum(dim=(1, 2, 3)) / (f.shape[1] * _area(f))
    for name in loss.style:
        if style is None:
            raise ValueError("style terms need a style target")
        out[f"style.{name}"] = losses.style_term(losses.gram_fast(fx[name], loss.gram), style[name])
    out["total"] = losses.weighted_total(out, loss)
    return out


def loss_and_grad(features, loss: LossConfig, x: Tensor, *,
                  content: Mapping[str, Tensor] | None = None,
                  style: Mapping[str, Tensor] | None = None,
                  seed: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """x's features, the terms of ``losses.distance_terms`` for x against the targets (``_terms``),
    and ∂(Σ_n seed_n · total_n)/∂x (N, 3, H, W) float32 (seed defaults to ones).

    content: target features {layer: (N or 1, C, H, W)}; style: target Grams
    {layer: (N or 1, C, C)}. float16 networks backpropagate seed gradients scaled by
    ``seed_scale`` (folded into the seeds), unscaled in float32 at the input.
    """
    feats, vjp = features_and_vjp(features, x)
    terms = _terms(feats, loss, content, style)
    if seed is None:
        seed = torch.ones_like(terms["total"])
    if features.body[0].weight.dtype == torch.float32:
        return feats, terms, vjp(terms_vjp(feats, loss, seed, content=content, style=style))
    scale = seed_scale(feats, loss, seed, terms, style=style)
    grads = terms_vjp(feats, loss, seed * scale, content=content, style=style)
    return feats, terms, vjp(grads, scale)
