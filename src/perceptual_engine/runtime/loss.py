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

from .. import kinds
from ..errors import InputError, ModelError, NotSupportedError
from .engine import Engine
from .providers import ProviderOptions


class _EngineTotal(torch.autograd.Function):
    """total (N,) from the engine; backward: grad_output[:, None, None, None] · grad.x.

    grad.x is a constant to autograd: the graph gives no second derivative. With
    create_graph=True (autograd runs the backward in grad mode), the first-order
    gradient is still returned, but as the output of _FirstOrderOnly, so a second
    backward through it (a gradient penalty, a Hessian-vector product) raises instead
    of silently treating ∂grad.x/∂x as zero.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, total: torch.Tensor, grad_x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_x)
        # Kept for create_graph only: the refusing node must sit on the path to x, or
        # autograd.grad(penalty, x) would prune it and drop the second-order term silently.
        # A plain attribute, not saved_tensors: an in-place update of x after the forward
        # (an optimizer step) must not invalidate the first-order backward.
        ctx.x = x
        return total.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _FirstOrderOnly.apply(grad_output, grad_x, ctx.x), None, None
        return grad_output[:, None, None, None] * grad_x, None, None


class _FirstOrderOnly(torch.autograd.Function):
    """grad_output · grad.x under create_graph=True; its own backward refuses. ``x`` is
    an input (unused by the forward) so that the result has this node as its grad_fn,
    on the path to x, even when grad_output does not require grad:
    ``once_differentiable`` lets that case through, and the second-order term of a
    gradient penalty would silently be zero."""

    @staticmethod
    def forward(ctx, grad_output: torch.Tensor, grad_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return grad_output[:, None, None, None] * grad_x

    @staticmethod
    def backward(ctx, *_: Any):
        raise NotSupportedError(
            "EnginePerceptualLoss gives first-order gradients only: the exported graph has no "
            "second derivative, so a backward through its gradient (create_graph=True, e.g. a "
            "gradient penalty or a Hessian-vector product) is refused rather than computed "
            "wrong. Compute that term with TorchPerceptualLoss (autograd supports it).")


def _tensor(v: Any) -> torch.Tensor:
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def _detached(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _torch_input(v: Any, name: str) -> torch.Tensor:
    """``v`` detached, if it is a tensor the engine can read; else InputError."""
    if not isinstance(v, torch.Tensor):
        hint = (" Wrap it with torch.from_numpy(a), or call Engine.distance, which takes numpy."
                if isinstance(v, np.ndarray) else "")
        raise InputError(f"EnginePerceptualLoss got {name} of type {type(v).__name__}; accepted: a "
                         f"torch.Tensor, float32 (N, 3, H, W), on the CPU or a CUDA device.{hint}")
    if v.device.type == "meta":
        raise InputError(f"EnginePerceptualLoss got {name} on the meta device (a shape without "
                         "data); accepted: a tensor with data, on the CPU or a CUDA device.")
    return v.detach()


def _no_grad_message(path: str, graph: str) -> str:
    if kinds.get(graph).grad:
        how = (f"Re-export it with export_onnx(spec, path, graph={graph!r}, ..., grad=True) "
               f"(perceptual-engine export --graph {graph} --grad).")
        return f"{path!r} is a {graph} graph without grad.x; EnginePerceptualLoss needs the exported gradient. {how}"
    return (f"{path!r} is a {graph} graph, which is not exported with a gradient; "
            f"EnginePerceptualLoss needs a {', '.join(kinds.names(grad=True))} graph with its gradient. Re-export it with "
            "export_onnx(spec, path, graph='distance', loss=loss, grad=True) (perceptual-engine "
            "export --graph distance --grad; the other kinds likewise).")


class EnginePerceptualLoss(nn.Module):
    """The loss of an exported ``grad=True`` model, as a torch module.

    path: an ONNX file from ``export_onnx(..., graph="distance", "target", "lpips" or "dists",
        grad=True)`` (``perceptual-engine export --grad``); its metadata supplies spec
        and loss. On an LPIPS model the keys are ``lpips.<l>`` and ``total`` (and
        ``spatial`` if exported with it); on a DISTS model ``texture.<s>``,
        ``structure.<s>`` and ``total``.
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
            raise ModelError(_no_grad_message(self.engine.path, info.graph))
        self.spec, self.loss = info.spec, info.loss

    def set_target(self, content: Any = None, style: Any = None) -> None:
        """Cache targets on a target model: see ``Engine.set_target`` (None keeps one)."""
        self.engine.set_target(content=_detached(content), style=_detached(style))

    def set_style_target(self, y: Any) -> None:
        """Cache the style image's Grams: ``set_target(style=y)``."""
        self.engine.set_style_target(_detached(y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        xd = _torch_input(x, "x")
        yd = None if y is None else _torch_input(y, "y")
        # On x's device: a CPU engine (ONNX Runtime CPU, OpenVINO) fed CUDA tensors answers
        # on the host, and autograd needs x's gradient where x is.
        out = {k: _tensor(v).to(x.device) for k, v in self.engine.distance(xd, yd).items()}
        grad_x = out.pop("grad.x")
        out["total"] = _EngineTotal.apply(x, out["total"], grad_x)
        return out

    def extra_repr(self) -> str:
        return f"path={self.engine.path!r}, providers={self.engine.providers}"


def stylize_options(device: str) -> ProviderOptions | None:
    """Options for an image optimization, which runs one shape for hundreds of steps:
    fixed shapes (cuDNN's EXHAUSTIVE choice, made once, and the CPU arena), and on an
    explicit CUDA device a CUDA graph of the step. A float16 model keeps its tensor cores
    whatever ``tf32`` says (the Engine applies ``provider_options.for_model``). None (the
    defaults) elsewhere: the CPU ignores them, and TensorRT takes a CUDA graph only when it
    runs every node."""
    if device != "cuda":
        return None
    return ProviderOptions(fixed_shapes=True, cuda_graph=True)


def on_engine_device(engine: Engine, x: Any) -> Any:
    """``x`` as a float32 torch tensor on the engine's GPU, so each step runs through
    IO binding without crossing PCIe; unchanged when the engine runs on the CPU."""
    if not engine.on_gpu:
        return x
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=f"cuda:{engine.options.device_id}", dtype=torch.float32)
