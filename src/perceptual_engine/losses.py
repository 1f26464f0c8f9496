"""The formulas, once. The PyTorch reference and the exported ONNX graphs both call these.

Shapes: features are (N, C, H, W); every term is per sample, shape (N,), float32.
Grams and all reductions are computed in float32 even for float16 features, and F
is scaled by 1/sqrt(norm) *before* the product, so that no intermediate can
overflow float16 even where a backend (TensorRT with fp16 on) lowers the MatMul.
The normalizer itself is built from per-axis counts (C, H, W: each at most a few
thousand, exact in float16), never from a C·H·W count that a float16 build would
turn into inf, and so every Gram into zeros.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .spec import LossConfig


def axis_size(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t's size along ``dim`` as a float32 scalar tensor, one axis at a time (products of
    sizes are taken in float32, never as int64 arithmetic on shapes: export/shapes.py).

    Exported, an input's own axis is read from its shape (Shape, Squeeze, Cast). An axis
    that is an expression of the input's sides (a pooled side, floor(H/2)) would export
    as integer Div, so it is counted from the tensor instead (a sum of ones along it).
    """
    size = t.shape[dim]
    if not isinstance(size, torch.SymInt) or size.node.expr.is_Symbol:
        return torch.scalar_tensor(size, dtype=torch.float32, device=t.device)
    index = tuple(slice(None) if i == dim else 0 for i in range(t.dim()))
    return torch.ones_like(t[index], dtype=torch.float32).sum()


def _rsqrt_count(f: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """1/√(Π sizes of ``dims``) as the product of per-axis 1/√size."""
    factor = torch.rsqrt(axis_size(f, dims[0]))
    for d in dims[1:]:
        factor = factor * torch.rsqrt(axis_size(f, d))
    return factor


def gram(f: torch.Tensor, norm: str = "chw") -> torch.Tensor:
    """G = F Fᵀ / norm per sample, F = f reshaped to C × (H·W); (N, C, H, W) -> (N, C, C).

    norm: "chw" divides by C·H·W, "hw" by H·W, "none" by 1.
    """
    flat = scaled_flat(f, norm)
    return torch.bmm(flat, flat.transpose(1, 2))


def scaled_flat(f: torch.Tensor, norm: str = "chw") -> torch.Tensor:
    """F/√norm in float32, F = f reshaped to C × (H·W): (N, C, H, W) -> (N, C, HW).

    The Gram is this times its transpose; backward.py uses it for the Gram's VJP.
    """
    flat = f.flatten(2).float()  # (N, C, HW)
    factor = gram_factor(f, norm)
    return flat if factor is None else flat * factor


def gram_factor(f: torch.Tensor, norm: str) -> torch.Tensor | None:
    """1/√norm for an (N, C, H, W) feature, as a float32 scalar tensor; None for "none"."""
    if norm == "chw":
        return _rsqrt_count(f, (1, 2, 3))
    if norm == "hw":
        return _rsqrt_count(f, (2, 3))
    if norm != "none":
        raise ValueError(f"unknown gram norm {norm!r}")
    return None


# float16 Grams: F/(16·√(H·W)) in float16, its product with its transpose accumulated in
# float32 and rounded to float16, then scaled back in float32 on the small (C, C) result.
# The float16 Gram is mean_k(f_i·f_j)/256, finite for activations up to 4096, and the
# scaled features stay normal float16 down to |f| ≈ 6e-5·16·√(H·W) (0.2 at 224²),
# below which a value's share of a Gram is under the float16 rounding of the larger ones.
HALF_GRAM_PRESCALE = 16.0


def gram_fast(f: torch.Tensor, norm: str = "chw") -> torch.Tensor:
    """The Gram of ``gram`` (float32 (N, C, C)), computed from float16 features without
    casting them to float32: float16 inputs, float32 accumulation (tensor cores on a GPU),
    pre-scaled so nothing overflows (HALF_GRAM_PRESCALE). float32 features and
    ``norm="none"`` (unbounded) take ``gram``'s float32 path."""
    if f.dtype != torch.float16 or norm == "none":
        return gram(f, norm)
    hw = axis_size(f, 2) * axis_size(f, 3)
    a = f.flatten(2) * (torch.rsqrt(hw) / HALF_GRAM_PRESCALE).to(f.dtype)
    g = torch.bmm(a, a.transpose(1, 2)).float() * (HALF_GRAM_PRESCALE ** 2)
    return g / axis_size(f, 1) if norm == "chw" else g


def half_difference(f: torch.Tensor, n) -> torch.Tensor:
    """f[:n] − f[n:] of a joined (2n, ...) batch, as (n, rest), in f's dtype.

    float16: a (1, 2) × (2, n·rest) product, so neither half is copied out first (an
    exported Slice copies); float16 inputs are exact on tensor cores and the product
    accumulates in float32, so the difference is float16's rounding of the exact one.
    float32: a plain subtraction of the halves, exact on every backend (a float32
    MatMul may run in TF32 on a GPU, which would round both halves to 10 bits first).
    """
    if f.dtype != torch.float16:
        return (f[:n] - f[n:]).reshape(n, -1)
    sign = torch.tensor([[1.0, -1.0]], dtype=f.dtype, device=f.device)
    return (sign @ f.reshape(2, -1)).reshape(n, -1)


def pair_terms(f: Mapping[str, torch.Tensor], n, loss: LossConfig) -> dict[str, torch.Tensor]:
    """The terms of ``distance_terms`` from the features of a joined batch (x's n
    images, then y's): content from the halves' difference (float32 sums of squares),
    style from the joined batch's Grams (``gram_fast``), split only as (n, C, C)."""
    out: dict[str, torch.Tensor] = {}
    for name in loss.content:
        d = half_difference(f[name], n)
        if d.dtype == torch.float32:
            # A mean of squares: ONNX Runtime's CPU ReduceSum/ReduceMean sum in blocks, its
            # ReduceSumSquare one value at a time (1e-3 off over a 224² tap, beyond float32's tier).
            out[f"content.{name}"] = (d * d).mean(dim=1)
            continue
        d = d.float()  # float16: the sum of squares (ReduceSumSquare) is well inside its tier
        out[f"content.{name}"] = (d * d).sum(dim=1) / (
            axis_size(f[name], 1) * axis_size(f[name], 2) * axis_size(f[name], 3))
    for name in loss.style:
        g = gram_fast(f[name], loss.gram)
        out[f"style.{name}"] = style_term(g[:n], g[n:])
    out["total"] = weighted_total(out, loss)
    return out


def content_term(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """mean over c, h, w of (F(x) − F(y))², per sample: (N, C, H, W) x2 -> (N,)."""
    d = fx.float() - fy.float()
    return (d * d).flatten(1).mean(dim=1)


def style_term(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """mean over i, j of (G(x) − G(y))², per sample: (N, C, C) x2 -> (N,)."""
    d = gx - gy
    return (d * d).flatten(1).mean(dim=1)


def style_grams(feats: Mapping[str, torch.Tensor], loss: LossConfig, *,
                fast: bool = False) -> dict[str, torch.Tensor]:
    """The Grams of every style layer of ``loss``: {layer: (N, C, C) float32}
    (``fast``: by ``gram_fast``, as the exported graphs compute them)."""
    g = gram_fast if fast else gram
    return {name: g(feats[name], loss.gram) for name in loss.style}


def weighted_total(terms: Mapping[str, torch.Tensor], loss: LossConfig) -> torch.Tensor:
    """total = Σ content weight_l · content_l + Σ style weight_l · style_l, per sample."""
    total = None
    for kind, weights in (("content", loss.content), ("style", loss.style)):
        for name, w in weights.items():
            part = terms[f"{kind}.{name}"] * w
            total = part if total is None else total + part
    assert total is not None  # LossConfig guarantees at least one term
    return total


def distance_terms(
    fx: Mapping[str, torch.Tensor],
    fy: Mapping[str, torch.Tensor] | None,
    loss: LossConfig,
    *,
    style_target: Mapping[str, torch.Tensor] | None = None,
    fast: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample terms ``content.<layer>``, ``style.<layer>`` and ``total``, each (N,).

    ``style_target`` gives precomputed Grams of y ((1, C, C) broadcasts over the
    batch) instead of ``fy`` for the style terms. ``fast``: Grams by ``gram_fast``
    (float16 products for float16 features), as the exported graphs compute them.
    """
    g = gram_fast if fast else gram
    out: dict[str, torch.Tensor] = {}
    for name in loss.content:
        if fy is None:
            raise ValueError("content terms need the features of y")
        out[f"content.{name}"] = content_term(fx[name], fy[name])
    for name in loss.style:
        gy = style_target[name] if style_target is not None else g(fy[name], loss.gram)
        out[f"style.{name}"] = style_term(g(fx[name], loss.gram), gy)
    out["total"] = weighted_total(out, loss)
    return out


def style_terms(
    gx: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], loss: LossConfig
) -> dict[str, torch.Tensor]:
    """Style terms and total from x's Grams and a target's Grams (the cached-target path)."""
    out = {f"style.{n}": style_term(gx[n], target[n]) for n in loss.style}
    out["total"] = weighted_total(out, loss)
    return out
