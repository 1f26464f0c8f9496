"""The variants the benchmark compares: the registry of them by name, and the device
the torch and GPU variants run on.

A variant says whether it can run here (``unavailable`` returns the reason when it
cannot) and makes a ``Runner`` for one Case. The harness times
``runner.build()`` plus the first ``runner.call(0)`` as the cold start, then the
hot calls. Every runner takes the same input sets.

CPU peers at the bf16 limit: ``torch-bf16-autocast`` (float32 weights, channels_last,
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the call, Grams included, as a
user writes it; on the gradient workloads the loss terms in float32, as every AMP row) and
``openvino-f32``/``openvino-bf16`` (the Engine on device="openvino").

The parts: variant_base.py (Context, Runner, Variant), tiers.py (precision tiers, the
tolerances of the parity check, TF32 switches), torch_variants.py (PyTorch, autograd on
the gradient workloads), ort_variants.py (the Engine: ONNX Runtime, TensorRT, OpenVINO).
Their names are re-exported here (``variants.TOLERANCE``, ``variants.TorchRunner``).
"""
from __future__ import annotations

from ..errors import ConfigError, DeviceError
from .ort_variants import OrtRunner, OrtVariant, openvino_unavailable
from .tiers import GRAD_FORGIVE, GRAD_TOLERANCE, TOLERANCE, strict_fp32, torch_tf32_on
from .torch_variants import TorchRunner, TorchVariant
from .variant_base import Context, Runner, Variant

__all__ = [
    "BASELINE", "REGISTRY", "resolve", "resolve_device",
    "TOLERANCE", "GRAD_TOLERANCE", "GRAD_FORGIVE", "torch_tf32_on", "strict_fp32",  # tiers.py
    "Context", "Runner", "Variant",  # variant_base.py
    "TorchRunner", "TorchVariant",  # torch_variants.py
    "OrtRunner", "OrtVariant", "openvino_unavailable",  # ort_variants.py
]

BASELINE = "torch-eager-fp32"

REGISTRY: dict[str, Variant] = {v.name: v for v in (
    TorchVariant("torch-eager-fp32", "PyTorch reference, eager, float32 (the usual snippet)", False),
    TorchVariant("torch-fp16-cl", "PyTorch eager, float16 weights, channels_last", True, "fp16-cl"),
    TorchVariant("torch-bf16-cl", "PyTorch eager, bfloat16 weights, channels_last", True, "bf16-cl"),
    TorchVariant("torch-compile", "torch.compile of the reference (default mode, static shapes)",
                 False, "compile"),
    TorchVariant("torch-compile-fp16-cl", "torch.compile of the float16 channels_last model "
                 "(train: AMP, terms in float32)", True, "compile-fp16-cl"),
    TorchVariant("torch-fp16-cl-autotune", "torch-fp16-cl with torch.backends.cudnn.benchmark "
                 "(cuDNN times its algorithms per shape)", True, "fp16-cl-autotune"),
    TorchVariant("torch-nograd-y", "PyTorch eager float32, y under no_grad (train only)", False,
                 "nograd-y"),
    TorchVariant("torch-bf16-autocast", "PyTorch eager, float32 weights, channels_last, "
                 "torch.autocast bfloat16 (Grams too; train: terms in float32)", False, "bf16-autocast"),
    OrtVariant("ort-cpu", "ONNX Runtime, CPU execution provider", False, "cpu"),
    OrtVariant("openvino-f32", "the Engine on OpenVINO CPU, f32", False, "openvino"),
    OrtVariant("openvino-bf16", "the Engine on OpenVINO CPU, bf16 (INFERENCE_PRECISION_HINT)",
               False, "openvino", precision="bf16"),
    OrtVariant("ort-cuda-fp32", "ONNX Runtime CUDA, float32, TF32 off, host I/O (numpy in/out)", True, "cuda"),
    OrtVariant("ort-cuda-tf32", "ONNX Runtime CUDA, float32 with TF32, host I/O (numpy in/out)", True, "cuda",
               tf32=True),
    OrtVariant("ort-cuda-fp16", "ONNX Runtime CUDA, float16 model, host I/O (numpy in/out)", True, "cuda",
               dtype="float16"),
    OrtVariant("ort-cuda-iobinding", "ONNX Runtime CUDA, float32, CUDA torch tensors via IO binding",
               True, "cuda", feed="torch-cuda"),
    OrtVariant("ort-cuda-graph", "ONNX Runtime CUDA, float32, IO binding + CUDA graph", True, "cuda",
               feed="torch-cuda", cuda_graph=True),
    # PyTorch's eager default runs its convolutions in TF32: this is the like-for-like row.
    OrtVariant("ort-cuda-tf32-iobinding", "ONNX Runtime CUDA, float32 with TF32, IO binding", True,
               "cuda", tf32=True, feed="torch-cuda"),
    OrtVariant("ort-cuda-fp16-iobinding", "ONNX Runtime CUDA, float16 model, IO binding", True,
               "cuda", dtype="float16", feed="torch-cuda"),
    OrtVariant("ort-cuda-fp16-nhwc", "as ort-cuda-fp16-iobinding with prefer_nhwc on (NHWC)",
               True, "cuda", dtype="float16", feed="torch-cuda", nhwc=True),
    OrtVariant("ort-cuda-fp16-graph", "ONNX Runtime CUDA, float16 model, IO binding + CUDA graph",
               True, "cuda", dtype="float16", feed="torch-cuda", cuda_graph=True),
    OrtVariant("ort-tensorrt", "ONNX Runtime TensorRT EP (TensorRT's default fp32/TF32), host I/O "
               "(numpy in/out)", True, "tensorrt", tf32=True),
)}


def resolve(names: tuple[str, ...]) -> list[Variant]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; accepted: {', '.join(REGISTRY)}.")
    return [REGISTRY[n] for n in names]


def resolve_device(requested: str) -> tuple[str, str]:
    """(device for torch/GPU variants, reason GPU variants cannot run or "")."""
    import torch

    from ..runtime.providers import cuda_gpu_count

    has_cuda = torch.cuda.is_available()
    why = "" if has_cuda else (cuda_gpu_count()[1] or "torch.cuda.is_available() is False")
    if requested == "cuda" and not has_cuda:
        raise DeviceError(f"--device cuda was requested but there is no CUDA GPU: {why}. "
                          "Use --device cpu or auto.")
    if requested == "cpu":
        return "cpu", "not run: --device cpu" if has_cuda else f"no CUDA GPU: {why}"
    return ("cuda", "") if has_cuda else ("cpu", f"no CUDA GPU: {why}")
