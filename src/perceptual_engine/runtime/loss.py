"""EnginePerceptualLoss: an exported gradient graph as a differentiable torch loss.

One engine run per forward computes every term and ``grad.x``, the gradient of
Σ_n total_n with respect to x; a ``torch.autograd.Function`` hands it to autograd,
so ``(w * out["total"]).sum().backward()`` gives x the exact gradient for any
per-sample weights w (row n of grad.x is ∂total_n/∂x_n, scaled by w_n).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .engine import Engine
from .providers import ProviderOptions


class _EngineTotal(torch.autograd.Function):
    """total (N,) from the engine; backward: grad_output[:, None, None, None] · grad.x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, total: torch.Tensor, grad_x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_x)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_x,) = ctx.saved_tensors
        return grad_output[:, None, None, None] * grad_x, None, None


def _tensor(v: Any) -> torch.Tensor:
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def _detached(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


class EnginePerceptualLoss(nn.Module):
    """The loss of an exported ``grad=True`` model, as a torch module.

    path: an ONNX file from ``export_onnx(..., graph="distance", "target" or "lpips",
        grad=True)`` (``perceptual-engine export --grad``); its metadata supplies spec
        and loss. On an LPIPS model the keys are ``lpips.<l>`` and ``total`` (and
        ``spatial`` if exported with it).
    device, options, precision: as for ``Engine`` ("auto", "cpu", "cuda", "tensorrt",
        "openvino"; on "openvino" the gradient is checked against ONNX Runtime fp32 like
        every output, and precision "auto" means f32 for gradient graphs).

    ``forward(x, y=None) -> {"content.<l>": (N,), "style.<l>": (N,), "total": (N,)}``,
    the keys of ``TorchPerceptualLoss``. x, y: float32 (N, 3, H, W) in the model's
    input range; CPU tensors (through numpy) or CUDA tensors (IO binding, zero copy,
    results on x's device). ``total`` is differentiable with respect to x (never
    y); the other terms are returned detached. On a distance model y is required;
    on a target model it is omitted and x is compared with ``set_target``'s targets.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto",
                 options: ProviderOptions | None = None, precision: str = "auto",
                 **engine_kwargs: Any) -> None:
        super().__init__()
        self.engine = Engine(path, device, options=options, precision=precision, **engine_kwargs)
        info = self.engine.info
        if not info.grad:
            what = "a features graph" if info.graph == "features" else f"a {info.graph} graph without grad.x"
            raise ModelError(
                f"{self.engine.path!r} is {what}; EnginePerceptualLoss needs the exported gradient. "
                "Re-export it with export_onnx(spec, path, graph='distance' or 'target', grad=True) "
                "(perceptual-engine export --graph distance --grad).")
        self.spec, self.loss = info.spec, info.loss

    def set_target(self, content: Any = None, style: Any = None) -> None:
        """Cache targets on a target model: see ``Engine.set_target`` (None keeps one)."""
        self.engine.set_target(content=_detached(content), style=_detached(style))

    def set_style_target(self, y: Any) -> None:
        """Cache the style image's Grams: ``set_target(style=y)``."""
        self.engine.set_style_target(_detached(y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {k: _tensor(v) for k, v in self.engine.distance(x.detach(), _detached(y)).items()}
        grad_x = out.pop("grad.x")
        out["total"] = _EngineTotal.apply(x, out["total"], grad_x)
        return out

    def extra_repr(self) -> str:
        return f"path={self.engine.path!r}, providers={self.engine.providers}"
