"""The PyTorch side of the gradient workloads: the value and ∂total/∂x by autograd.

- ``train``: the perceptual loss of an (x, y) pair and its gradient with respect to
  x, as a training step needs it. The baseline is the usual snippet: one pass over
  ``torch.cat([x, y])`` with frozen weights, so autograd records (and the backward
  runs through) the whole 2N batch although only x's half is wanted. The other
  PyTorch variants compute y's features under ``no_grad``.
- ``stylize-step``: one step of image optimization: x against cached targets (the
  content image's features, the style image's Grams), value and gradient.

Every variant returns the terms and ``grad.x`` = ∂(Σ_n total_n)/∂x, (N, 3, H, W).

AMP (float16/bfloat16) is written as a careful training loop writes it: the network runs
under autocast, the loss terms (the Grams' products included) in float32 outside it.
Under autocast the Gram's bmm would run in half precision, and every style term came out
wrong (relative error 1.0: the first H200 run's torch-fp16-cl train row).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .. import losses

# AMP float16: the loss is multiplied by this before the backward and the gradient
# divided by it afterwards, so small gradients do not flush to zero in half
# precision (a power of two: the scaling itself is exact).
FP16_LOSS_SCALE = 1024.0

Terms = Callable[[Any, Any], dict[str, Any]]


def cached_targets(case: Any, model: Any, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(content features, style Grams) of a stylize-step case's target images, float32."""
    import torch

    feats, loss = model.features, model.loss
    with torch.no_grad():
        fc = feats.extract(torch.from_numpy(case.content_target).to(device))
        fs = feats.extract(torch.from_numpy(case.target).to(device))
        return ({n: fc[n].float() for n in loss.content},
                {k: v.float() for k, v in losses.style_grams(fs, loss).items()})


def terms_fn(case: Any, model: Any, snippet: bool, targets: tuple | None = None, amp: Any = None) -> Terms:
    """``f(x, y) -> terms`` for the case; "total" is differentiable with respect to x.

    snippet: the baseline's one pass over cat([x, y]) (train only); otherwise y's
    features are computed under no_grad and only x's pass is recorded.
    amp: None, torch.float16 or torch.bfloat16: the network's convolutions under autocast
    in that dtype; the features are cast to float32 and the terms computed outside it.
    """
    import torch

    loss = model.loss
    feats = _Autocast(model.features, amp) if amp is not None else model.features
    if case.workload.name == "stylize-step":
        content, grams = targets  # type: ignore[misc]

        def step(x: Any, y: Any = None) -> dict[str, Any]:
            return losses.distance_terms(feats.extract(x), content, loss, style_target=grams)

        return step
    if snippet:
        def both(x: Any, y: Any) -> dict[str, Any]:
            n = x.shape[0]
            f = feats.extract(torch.cat([x, y]))
            return losses.distance_terms({k: v[:n] for k, v in f.items()},
                                         {k: v[n:] for k, v in f.items()}, loss)

        return both

    def split(x: Any, y: Any) -> dict[str, Any]:
        with torch.no_grad():
            fy = feats.extract(y)
        return losses.distance_terms(feats.extract(x), fy, loss)

    return split


class _Autocast:
    """``features.extract`` under autocast, its taps returned in float32: the network in
    half precision, what the loss sees (and the Grams it builds) in float32."""

    def __init__(self, features: Any, dtype: Any) -> None:
        self.features, self.dtype = features, dtype

    def extract(self, x: Any) -> dict[str, Any]:
        import torch

        with torch.autocast(x.device.type, dtype=self.dtype):
            taps = self.features.extract(x)
        return {k: v.float() for k, v in taps.items()}


def value_and_grad(f: Terms, feeds: Mapping[str, Any], *, amp: Any = None) -> dict[str, Any]:
    """Run ``f`` on the feeds with x as a fresh leaf, backpropagate Σ total, return the
    detached terms and ``grad.x``. amp: the dtype ``f`` autocasts its network to (terms_fn's
    ``amp``): float16 scales the loss by FP16_LOSS_SCALE before the backward. ``f`` itself
    decides what runs under autocast; nothing here does."""
    import torch

    x = feeds["x"].detach().requires_grad_(True)
    scale = FP16_LOSS_SCALE if amp is torch.float16 else 1.0
    out = f(x, feeds.get("y"))
    (out["total"].sum() * scale).backward()
    result = {k: v.detach() for k, v in out.items()}
    grad = x.grad
    assert grad is not None  # x is a leaf that requires grad and total depends on it
    result["grad.x"] = grad / scale if scale != 1.0 else grad
    return result
