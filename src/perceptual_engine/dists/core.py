"""DISTS (Ding, Ma, Wang, Simoncelli 2020; the authors' ``DISTS_pytorch`` 0.1): everything
of the graph kind "dists" in one place: spec, weights, head, its VJP, graph and reference.

VGG16 with L2 pooling (``FeatureSpec(pooling="l2")``), six stages: the input image itself
(in [0, 1], not normalized, as DISTS_pytorch) and relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3. Per stage s and channel c, over space, with c1 = c2 = 1e-6::

    t_c = (2 μx μy + c1) / (μx² + μy² + c1)          texture
    s_c = (2 σxy + c2) / (σx² + σy² + c2)            structure
          (computed as 1 − t_c = (μx − μy)² / (μx² + μy² + c1) and
           1 − s_c = var(x − y) / (σx² + σy² + c2): see ``_terms``)
    texture.<s>   = Σ_c α_c (1 − t_c)                 (N,)
    structure.<s> = Σ_c β_c (1 − s_c)                 (N,)
    total         = Σ_s texture.<s> + structure.<s>   = 1 − Σ (α t + β s)

α, β (1475 channels each) divided by (Σα + Σβ), so the terms sum to DISTS_pytorch's
score. Ratios are float32 whatever the network's precision; the forward graph of a
float16 network takes its statistics from float16 maps by reductions that accumulate in
float32 (``joined_head``). No sqrt is taken of a variance, so the VJP is finite on
constant images (σ = 0).

α and β come from the installed DISTS_pytorch wheel's ``weights.pt`` (found without
importing it: it imports torchvision and downloads VGG16) or a file the caller names.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .. import backward
from .. import layers as _layers
from ..errors import ConfigError, DistsWeightsError
from ..outputs import dists_output_names
from ..reference import TorchFeatures
from ..trunks.modules import L2Pool
from ..spec import FeatureSpec
from ..validate import check_pair
from ..weights import Weights

GRAPH = "dists"
ARCH = "vgg16"
POOLING = "l2"
LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
STAGES: tuple[str, ...] = ("input",) + LAYERS
CHANNELS: tuple[int, ...] = (3, 64, 128, 256, 512, 512)
C1 = C2 = 1e-6
INSTALL_HINT = ("pip install perceptual-engine[dists] (the DISTS_pytorch wheel ships weights.pt), "
                "or give a file with dists_weights=PATH / --dists-weights PATH")


def output_names(layers: tuple[str, ...] = LAYERS) -> tuple[str, ...]:
    """``texture.<s>`` and ``structure.<s>`` per stage (``input`` and the taps), ``total``."""
    return dists_output_names(layers)


def default_spec(weights: str = "imagenet", *, seed: int = 0) -> FeatureSpec:
    """The spec of DISTS: VGG16 with L2 pooling, the five taps, inputs in [0, 1]."""
    return FeatureSpec(arch=ARCH, layers=LAYERS, weights=weights, seed=seed, input_range="0,1",
                       pooling=POOLING)


def spec_from_flags(flags: object) -> FeatureSpec:
    """The spec of a DISTS graph from the command line's spec flags: VGG16, L2 pooling,
    its five taps, [0, 1] inputs; only ``weights`` and ``seed`` may be given (ConfigError
    naming the others)."""
    given = [f"--{n.replace('_', '-')}" for n in ("content", "style", "gram", "arch", "layers",
                                                   "input_range", "pooling")
             if getattr(flags, n, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} do not apply to --graph dists: DISTS is VGG16 with L2 "
                          "pooling at relu1_2..relu5_3 on [0, 1] images, with its own head. Drop them "
                          "(--weights and --seed choose the trunk).")
    seed = getattr(flags, "seed", None)
    return default_spec(getattr(flags, "weights", None) or "imagenet", seed=0 if seed is None else seed)


def check_spec(spec: FeatureSpec) -> None:
    """DISTS is defined on VGG16 with L2 pooling at its five taps, on [0, 1] images."""
    if spec.arch != ARCH or tuple(spec.layers) != LAYERS or spec.pooling != POOLING \
            or spec.input_range != "0,1":
        raise ConfigError(
            f"DISTS needs arch 'vgg16', layers {','.join(LAYERS)}, pooling 'l2' and input range "
            f"'0,1'; got arch {spec.arch!r}, layers {','.join(spec.layers)}, pooling {spec.pooling!r}, "
            f"input range {spec.input_range!r}. Use perceptual_engine.dists.default_spec(weights) "
            "(on the command line: --graph dists without --arch, --layers, --pooling or --input-range).")


# -- alpha and beta ------------------------------------------------------------------

@dataclass(frozen=True)
class DistsWeights:
    """α and β, each (1, 1475, 1, 1) float32, finite, >= 0, as stored (not normalized)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    source: str  # the file read
    sha256: str  # of the tensors (keys and float32 bytes), not of the pickle

    def split(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per stage, α and β divided by (Σα + Σβ), each (1, C_s)."""
        total = self.alpha.sum() + self.beta.sum()
        a = torch.split((self.alpha / total).flatten(1), list(CHANNELS), dim=1)
        b = torch.split((self.beta / total).flatten(1), list(CHANNELS), dim=1)
        return a, b

    def metadata(self) -> dict[str, Any]:
        """The model metadata's ``dists`` field."""
        return {"weights_source": self.source, "weights_sha256": self.sha256}


def default_weights_path() -> str:
    """``DISTS_pytorch/weights.pt`` of the installed wheel (not imported)."""
    try:
        found = importlib.util.find_spec("DISTS_pytorch")
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = os.path.join(folder, "weights.pt")
        if os.path.isfile(path):
            return path
    what = "is not installed" if not folders else f"has no weights.pt in {folders}"
    raise DistsWeightsError(f"the DISTS alpha/beta weights were not found: the DISTS_pytorch package {what}. "
                       f"Fix: {INSTALL_HINT}.")


def load_weights(path: str | os.PathLike | None = None) -> DistsWeights:
    """Read and check α and β; ``path`` None means the DISTS_pytorch wheel's ``weights.pt``.

    A torch pickle loaded with ``weights_only=True`` (no code runs) onto the CPU, with
    exactly the keys ``alpha`` and ``beta``, each (1, 1475, 1, 1), finite and >= 0.
    """
    from ..weights import read_torch_file

    path = default_weights_path() if path is None else os.fspath(path)
    raw = read_torch_file(path, "DISTS weights file", DistsWeightsError, formats=".pt")
    return check_weights(raw, path)


def check_weights(raw: object, source: str) -> DistsWeights:
    """The checks of ``load_weights`` on an already loaded mapping."""
    shape = (1, sum(CHANNELS), 1, 1)
    if not isinstance(raw, Mapping) or set(map(str, raw)) != {"alpha", "beta"}:
        got = sorted(map(str, raw))[:6] if isinstance(raw, Mapping) else type(raw).__name__
        raise DistsWeightsError(f"DISTS weights {source!r} hold {got}; accepted: a dict with exactly the keys "
                           "'alpha' and 'beta'. Use DISTS_pytorch's weights.pt or a file saved the same way.")
    from ..weights import checked_head_tensor

    out, h = {}, hashlib.sha256()
    for key in ("alpha", "beta"):
        t = checked_head_tensor(
            raw[key], what="DISTS", key=key, source=source, shape=shape, error=DistsWeightsError,
            shape_hint="(3 + 64 + 128 + 256 + 512 + 512 channels of VGG16).",
            file_fix="use DISTS_pytorch's weights.pt.",
            negative_fix="As trained, alpha and beta are >= 0: use DISTS_pytorch's weights.pt.",
            digest=h)
        out[key] = t
    w = DistsWeights(out["alpha"], out["beta"],
                     os.path.abspath(source) if os.path.exists(source) else source, h.hexdigest())
    check_derived(w)
    return w


def check_derived(w: DistsWeights) -> None:
    """What the graph derives from α and β, as it computes it (float32): their sum, and α
    and β divided by it, finite, the sum > 0. Values each finite and >= 0 can still sum
    to infinity (two of 3e38), which would make every score 0."""
    total = w.alpha.sum() + w.beta.sum()
    exact = float(w.alpha.double().sum() + w.beta.double().sum())
    fix = ("The score divides them by their sum, so any common factor gives the same score: "
           "re-save them divided by it, torch.save({'alpha': a / s, 'beta': b / s}, path) with "
           "s = float(a.double().sum() + b.double().sum()), or use DISTS_pytorch's weights.pt.")
    if exact <= 0:
        raise DistsWeightsError(f"DISTS weights {w.source!r} are all zero; the score divides by their "
                                "sum. Use DISTS_pytorch's weights.pt.")
    if not torch.isfinite(total):
        raise DistsWeightsError(f"DISTS weights {w.source!r} sum to {exact:.3g}, beyond float32 (3.4e38), "
                                f"where the graph computes that sum; accepted: alpha and beta whose sum is "
                                f"finite in float32. {fix}")
    a, b = w.split()
    if not all(torch.isfinite(t).all() for t in (*a, *b)):
        raise DistsWeightsError(f"DISTS weights {w.source!r} divided by their sum ({exact:.3g}) are not "
                                f"finite in float32; accepted: a sum of normal float32 size. {fix}")


def resolve_weights(value: "DistsWeights | str | os.PathLike | None", spec: FeatureSpec | None = None) -> DistsWeights:
    """DistsWeights as given, or read from a path (None: DISTS_pytorch's file); ``spec``
    is accepted for the heads' common signature (DISTS has one trunk)."""
    return value if isinstance(value, DistsWeights) else load_weights(value)


# -- the head ------------------------------------------------------------------------

def _terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(1 − t) and (1 − s) per sample and channel, (N, C) float32, and the pieces their VJP
    reuses. Written as distances, 1 − t = (μa − μb)² / (μa² + μb² + c1) and 1 − s =
    var(a − b) / (σa² + σb² + c2) (σa² + σb² − 2σab = var(a − b)), rather than as one
    minus a ratio near 1: exactly 0 for a = b and free of that cancellation."""
    a, b = a.float(), b.float()
    ma, mb = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
    va = ((a - ma[:, :, None, None]) ** 2).mean(dim=(2, 3))
    vb = ((b - mb[:, :, None, None]) ** 2).mean(dim=(2, 3))
    d = a - b
    vd = ((d - (ma - mb)[:, :, None, None]) ** 2).mean(dim=(2, 3))
    tn, td = (ma - mb) ** 2, ma * ma + mb * mb + C1
    sn, sd = vd, va + vb + C2
    return tn / td, sn / sd, (ma, mb, tn, td, sn, sd, d)


def stages(x: torch.Tensor, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The six stages: the image x itself, then the taps."""
    return {"input": x, **{n: feats[n] for n in LAYERS}}


def head(fx: Mapping[str, torch.Tensor], fy: Mapping[str, torch.Tensor],
         w: DistsWeights) -> dict[str, torch.Tensor]:
    """``texture.<s>``, ``structure.<s>`` and ``total``, each (N,) float32; fx, fy: ``stages``."""
    alpha, beta = w.split()
    tex, struct = {}, {}
    for s, a, b in zip(STAGES, alpha, beta):
        dt, ds, _ = _terms(fx[s], fy[s])
        tex[f"texture.{s}"] = (a * dt).sum(dim=1)
        struct[f"structure.{s}"] = (b * ds).sum(dim=1)
    out = {**tex, **struct}
    total = None
    for v in out.values():
        total = v if total is None else total + v
    out["total"] = total
    return out


def head_vjp(fx: Mapping[str, torch.Tensor], fy: Mapping[str, torch.Tensor], w: DistsWeights,
             seed: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂(Σ_n seed_n · total_n)/∂fx per stage: {stage: (N, C, h, w) float32}; y is constant."""
    alpha, beta = w.split()
    seed = seed.float()[:, None]
    out = {}
    for s, a, b in zip(STAGES, alpha, beta):
        _, _, (ma, mb, tn, td, sn, sd, d) = _terms(fx[s], fy[s])
        g_tn, g_td = backward.ratio_vjp(seed * a, tn, td)
        g_sn, g_sd = backward.ratio_vjp(seed * b, sn, sd)
        # tn = (μa − μb)², td = μa² + μb² + c1; sn = var(a − b), sd = var(a) + var(b) + c2.
        g_mean = g_tn * 2 * (ma - mb) + g_td * 2 * ma
        out[s] = (backward.mean_vjp(g_mean, fx[s]) + backward.variance_vjp(g_sn, d)
                  + backward.variance_vjp(g_sd, fx[s]))
    return out


def dists_and_grad(features: TorchFeatures, x: torch.Tensor, fy: Mapping[str, torch.Tensor],
                   w: DistsWeights) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The head's outputs for x against y's ``stages`` ``fy``, and ∂(Σ_n total_n)/∂x
    (N, 3, H, W) float32 by hand-written VJPs (traceable into ONNX). float16 networks
    backpropagate a per-sample power-of-two scaled seed, unscaled in float32."""
    feats, vjp = backward.features_and_vjp(features, x)
    fx = stages(x, feats)
    out = head(fx, fy, w)
    grads = head_vjp(fx, fy, w, torch.ones_like(out["total"]))
    g_input = grads.pop("input")  # the image stage: straight to x
    if features.body[0].weight.dtype == torch.float32:
        return out, vjp(grads) + g_input
    scale = backward.loss_scale(grads)
    return out, vjp({k: g * scale for k, g in grads.items()}) / scale + g_input


# -- the forward head on x and y as one batch -----------------------------------------
# The forward graph runs x and y as one batch with each x_n next to its y_n, (N·2, C, h, w),
# and takes every statistic of both from that batch: no tap is cut into x and y halves
# (ONNX Runtime's Slice copies), and only reduced (N·2, C) statistics are split. A float16
# map stays float16 up to its reductions; only their (N·2, C) results are cast to float32.

def scaled_convs(features: TorchFeatures) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{index: (weight, bias)} of the convolutions around float16 taps, rescaled so that
    no pass over a map does the scaling by k = ``L2Pool.scale`` (1/16); empty for float32:

    - each tap's convolution, weight and bias times k: ReLU(k·a) = k·ReLU(a) for k > 0,
      so the tap leaves its ReLU scaled. k is a power of two: the products are exact but
      below float16's normal range (weights under 2⁻¹⁰, rounded by at most 2⁻²⁵·16);
    - the convolution after each L2 pooling, weight divided by k (exact): it takes the
      pooled root k·y as it comes (``L2Pool.root_prescaled``), without the ×1/k and the
      floor that only a VJP's 1/y needs (an all-zero window gives 0, not 1e-6)."""
    body = features.body
    k = L2Pool.scale(body[0].weight.dtype)
    if k == 1.0:
        return {}
    out = {}
    for i in features._taps:
        out[i - 1] = (body[i - 1].weight * k, body[i - 1].bias * k)
        if i + 2 < len(body) and isinstance(body[i + 1], L2Pool):
            out[i + 2] = (body[i + 2].weight * (1.0 / k), body[i + 2].bias)
    if len(out) != len(features._taps) * 2 - 1:  # VGG16: no convolution is both
        raise ValueError("a convolution both follows an L2 pooling and precedes a tap")
    return out


def joined_stages(features: TorchFeatures, x: torch.Tensor, y: torch.Tensor,
                  convs: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> dict[str, tuple[torch.Tensor, float]]:
    """{stage: (z, k)}: z the stage's maps of x_1, y_1, x_2, y_2, ... (N·2, C, h, w) times k.

    The image stage is float32 with k = 1. A float16 network's taps are multiplied by
    ``L2Pool.scale`` (1/16), and the L2 pooling after a tap pools that scaled map.
    convs: ``scaled_convs(features)`` (as buffers of the traced module), which do the
    scaling inside the convolutions; without it, a Mul scales each tap and each L2
    pooling unscales its result."""
    n = x.shape[0]
    xy = torch.cat([x, y], dim=1).reshape(n * 2, x.shape[1], x.shape[2], x.shape[3])
    out = {"input": (xy, 1.0)}
    body, taps, convs = features.body, features._taps, convs or {}
    h = features.normalize(xy)
    if h.dtype != body[0].weight.dtype:
        h = h.to(body[0].weight.dtype)
    scaled = None  # the last tap times k, when an L2Pool follows it
    for i, mod in enumerate(body):
        if scaled is not None:
            h = mod.root_prescaled(scaled) if i + 1 in convs else mod.pool_prescaled(scaled)
        elif i in convs:
            h = torch.nn.functional.conv2d(h, *convs[i], padding=mod.padding)
        else:
            h = mod(h)
        scaled = None
        if i in taps:
            k = L2Pool.scale(h.dtype)
            after = body[i + 1] if i + 1 < len(body) else None
            z = h if k == 1.0 or i - 1 in convs else h * k
            if isinstance(after, L2Pool):
                scaled = z
            out[taps[i]] = (z, k)
    return out


def _stage_statistics(z: torch.Tensor, n: int, matmul: bool = True) -> tuple[torch.Tensor, ...]:
    """Of one stage's joined maps z (N·2, C, h, w): the means μ (N·2, C, 1, 1) float32,
    and over h, w the roots of Σ (z − μ)² (N·2, C) and of Σ ((zx − μx) − (zy − μy))²
    (N, C), in z's dtype.

    float16: the mean over w first, then over h in float32. ONNX Runtime's CUDA mean
    accumulates in float32 but stores the sum in its float16 output before dividing:
    a row's sum fits where the sum over h·w may not. The roots are ReduceL2s, which
    cuDNN accumulates in float32 and whose results stay far inside float16's range
    (squares of float16 maps are not). Each pair's difference is one MatMul of
    (1, −1) with its two maps: no copy of either half. ``matmul=False``: a Sub of the
    two halves instead (for the small image stage, float32, exact even where a float32
    MatMul runs in TF32, which rounds both maps to 10 bits before subtracting)."""
    if z.dtype == torch.float16:
        mu = z.mean(dim=3, keepdim=True).float().mean(dim=2, keepdim=True)
    else:
        mu = z.mean(dim=(2, 3), keepdim=True)
    c = z - mu.to(z.dtype)
    pairs = c.reshape(n, 2, -1)  # (N, 2, C·h·w): x_n's maps, then y_n's
    if matmul:
        d = torch.matmul(pairs.new_tensor([[1.0, -1.0]]), pairs).reshape(n, c.shape[1], -1)
    else:
        cx, cy = pairs.chunk(2, dim=1)
        d = (cx - cy).reshape(n, c.shape[1], -1)
    if z.dtype == torch.float16:
        return mu, torch.linalg.vector_norm(c, dim=(2, 3)), torch.linalg.vector_norm(d, dim=2)
    # float32: sums of squares, which ONNX Runtime's CPU adds in blocks (its ReduceL2 adds one
    # value at a time: 7e-5 off on a 224² DISTS structure term, against 1e-5 this way).
    return mu, torch.sqrt((c * c).sum(dim=(2, 3))), torch.sqrt((d * d).sum(dim=2))


def _cat_float32(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated on axis 1 as float32, with one Cast per run of float16 parts."""
    runs: list[list[torch.Tensor]] = []
    for p in parts:
        if runs and runs[-1][0].dtype == p.dtype:
            runs[-1].append(p)
        else:
            runs.append([p])
    return torch.cat([torch.cat(r, dim=1).float() for r in runs], dim=1)


_DOWNSAMPLE = (1,) + tuple(_layers.resolve(ARCH, n).downsample for n in LAYERS)  # per stage


def stage_areas(x: torch.Tensor) -> torch.Tensor:
    """h·w of each stage's maps for images x, (6,) float32: the image's, then each tap's,
    whose sides are ⌈side / 2^p⌉ after p L2 poolings (3×3, stride 2, padding 1). In
    float32 from x's sides: no integer arithmetic on shapes (export/shapes.py)."""
    per = torch.tensor([1.0 / d for d in _DOWNSAMPLE], device=x.device)
    one = x.new_ones((), dtype=torch.float32)
    rows = torch.ceil(one * torch.sym_float(x.shape[2]) * per)
    return rows * torch.ceil(one * torch.sym_float(x.shape[3]) * per)


def joined_head(stages_: Mapping[str, tuple[torch.Tensor, float]], x: torch.Tensor,
                w: DistsWeights) -> dict[str, torch.Tensor]:
    """``head``'s terms from ``joined_stages`` (x: the images, for N and the sides).

    All stages' statistics are concatenated over channels (1475) and the ratios taken
    once. With a stage's maps scaled by k (k and h·w cancel elsewhere):
    1 − t = (μx − μy)² / (μx² + μy² + c1·k²) and
    1 − s = Σ (dx − dy)² / (Σ (x − μx)² + Σ (y − μy)² + c2·k²·h·w), as in ``_terms``."""
    n = x.shape[0]
    # The product form only where its inputs are float16 (exact on tensor cores); float32
    # maps are subtracted, exact even where a float32 MatMul would run in TF32.
    stats = [_stage_statistics(stages_[s][0], n, matmul=s != "input" and stages_[s][0].dtype == torch.float16)
             for s in STAGES]
    mu = torch.cat([m for m, _, _ in stats], dim=1).reshape(n, 2, -1)  # (N, 2, 1475)
    root = _cat_float32([r for _, r, _ in stats]).reshape(n, 2, -1)
    droot = _cat_float32([d for _, _, d in stats])  # (N, 1475)
    k2 = torch.cat([torch.full((c,), stages_[s][1] ** 2, device=x.device) for s, c in zip(STAGES, CHANNELS)])
    index = torch.cat([torch.full((c,), i, device=x.device) for i, c in enumerate(CHANNELS)])
    area = stage_areas(x).index_select(0, index)
    mx, my = mu[:, 0], mu[:, 1]
    dt = (mx - my) ** 2 / ((mu * mu).sum(dim=1) + C1 * k2)
    ds = droot ** 2 / ((root * root).sum(dim=1) + C2 * k2 * area)
    alpha, beta = w.alpha.to(x.device), w.beta.to(x.device)
    total = alpha.sum() + beta.sum()
    weighted = torch.cat([dt, ds], dim=1) * (torch.cat([alpha, beta], dim=1).flatten(1) / total)
    names = [f"texture.{s}" for s in STAGES] + [f"structure.{s}" for s in STAGES]
    out = {k: part.sum(dim=1) for k, part in zip(names, weighted.split(list(CHANNELS) * 2, dim=1))}
    out["total"] = weighted.sum(dim=1)
    return out


# -- the graph the exporter traces, and the reference --------------------------------

class DistsGraph(nn.Module):
    """(x, y) (N, 3, H, W) float32 in [0, 1] -> ``texture.<s>``, ``structure.<s>``,
    ``total`` (N,), and with ``grad`` last ``grad.x`` (N, 3, H, W); all float32."""

    def __init__(self, features: TorchFeatures, w: DistsWeights, grad: bool = False) -> None:
        super().__init__()
        self.features, self.w, self.grad = features, w, grad
        scaled = {} if grad else scaled_convs(features)
        for i, (weight, bias) in scaled.items():
            self.register_buffer(f"scaled_conv{i}_weight", weight, persistent=False)
            self.register_buffer(f"scaled_conv{i}_bias", bias, persistent=False)
        self._scaled_convs = tuple(scaled)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.grad:
            convs = {i: (getattr(self, f"scaled_conv{i}_weight"), getattr(self, f"scaled_conv{i}_bias"))
                     for i in self._scaled_convs}
            return tuple(joined_head(joined_stages(self.features, x, y, convs), x, self.w).values())
        fy = stages(y, self.features.extract(y))
        out, gx = dists_and_grad(self.features, x, fy, self.w)
        return tuple(out.values()) + (gx,)


class TorchDISTS(nn.Module):
    """DISTS on the reference network: ``forward(x, y) -> {"texture.<s>", "structure.<s>",
    "total"}``, each (N,) float32; x, y in [0, 1]. Differentiable by autograd.

    spec: ``default_spec(weights)`` (VGG16, L2 pooling, the five taps).
    dists_weights: DistsWeights, a .pt path, or None for DISTS_pytorch's weights.pt.
    """

    def __init__(self, spec: FeatureSpec, dists_weights: "DistsWeights | str | None" = None, *,
                 weights: Weights | None = None) -> None:
        super().__init__()
        check_spec(spec)
        self.spec = spec
        self.w = resolve_weights(dists_weights)
        self.features = TorchFeatures(spec, weights=weights)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Without input validation (the exporter's verification calls this)."""
        fx, fy = self.features.extract_pair(x, y)
        return head(stages(x, fx), stages(y, fy), self.w)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(x, y, self.spec)
        return self.terms(x, y)


def build(traced: TorchFeatures, spec: FeatureSpec, weights: Weights, dists_weights: Any,
          grad: bool, spatial: bool = False) -> tuple[nn.Module, TorchDISTS]:
    """(the module to trace, the float32 reference to verify it against) for export_onnx.
    ``spatial``: DISTS has no per-pixel map (the exporter refuses it first)."""
    w = resolve_weights(dists_weights)
    return DistsGraph(traced, w, grad), TorchDISTS(spec, w, weights=weights)
