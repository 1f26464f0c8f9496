"""ProviderOptions, the knobs of the GPU providers, and the option dicts they become
for ONNX Runtime's CUDA and TensorRT execution providers (plus the memory the
estimate counts for cuDNN's workspace, and the stream ONNX Runtime runs on).

Pure functions of their arguments, so the option assembly is unit-tested on
machines without a GPU.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .profiles import ProfileInputs, ShapeRange


@dataclass(frozen=True)
class ProviderOptions:
    """Knobs for the GPU providers; defaults are the fast, documented choices.

    fixed_shapes: inputs keep one shape -> cuDNN EXHAUSTIVE algorithm search with
        the largest workspace cuDNN asks for (slow first call, fastest after);
        False -> HEURISTIC search and a bounded workspace (no re-search per shape,
        no GBs of scratch memory kept by the arena).
    tf32: allow TF32 tensor-core math for float32 (faster, ~1e-3 relative error).
    prefer_nhwc: CUDA EP runs convolutions in NHWC. Off by default: every feature
        tap and Gram then needs an NHWC->NCHW transpose, and it is not measured
        faster here (scripts/gpu_check.py measures both); turn it on where it is.
    cuda_graph: capture the whole run as a CUDA graph (needs fixed shapes and IO binding).
    fp16: TensorRT builds float16 kernels (where TensorRT 10 still has the flag).
    cache_dir: where TensorRT engine and timing caches live (keyed by model hash).
    shapes: TensorRT optimization profile (ShapeRange; default up to 8 x 512 x 512).
    gpu_mem_limit: cap of ONNX Runtime's CUDA arena: bytes (int), a fraction of the
        GPU's memory (float in (0, 1], default 0.5, so torch in the same process
        keeps room), or None for no cap.
    user_stream: a cudaStream_t address for ONNX Runtime to run on (0: the default
        stream). None: ONNX Runtime's own stream, synchronized around each IO-binding
        call; or torch's current stream when ``share_torch_stream`` is set and torch has
        already initialized CUDA.
    share_torch_stream: opt in to running on torch's current stream (no host
        synchronization per call). Off by default: on an H200 with onnxruntime-gpu
        1.31.1, sessions on torch's stream read wrong shapes in the Gram's reshape
        (scripts/gpu_stream_check.py, docs/gpu.md).
    """

    device_id: int = 0
    fixed_shapes: bool = False
    tf32: bool = True
    prefer_nhwc: bool = False
    cuda_graph: bool = False
    fp16: bool = False
    cache_dir: str | None = None
    shapes: ShapeRange = field(default_factory=ShapeRange)
    gpu_mem_limit: int | float | None = 0.5
    user_stream: int | None = None
    share_torch_stream: bool = False

    def __post_init__(self) -> None:
        m = self.gpu_mem_limit
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0
                              or (isinstance(m, float) and m > 1)):
            raise ConfigError(f"gpu_mem_limit={m!r} is not accepted; accepted: bytes (int > 0), a "
                              "fraction of the GPU's memory (float in (0, 1]) or None (no cap).")


# What cuDNN's convolution workspace is counted at in the memory estimate (bytes):
# with the bounded workspace (HEURISTIC search), and with the largest one cuDNN asks
# for (fixed_shapes: EXHAUSTIVE). Not measured yet: scripts/gpu_check.py records the
# GPU memory each engine takes (stage layout), to set these from.
HEURISTIC_WORKSPACE = 256 << 20
MAX_WORKSPACE = 2 << 30


def mem_limit_bytes(o: ProviderOptions) -> int | None:
    """``o.gpu_mem_limit`` in bytes (a fraction is of the GPU's total memory)."""
    m = o.gpu_mem_limit
    if m is None or isinstance(m, int):
        return m
    from ..cuda_driver import total_memory

    total = total_memory(o.device_id)
    return None if total is None else int(total * m)


def workspace_bytes(o: ProviderOptions) -> int:
    """What cuDNN's convolution workspace is counted at in the memory estimate: the
    bounded one, or with max workspace (fixed_shapes) MAX_WORKSPACE, within the arena cap."""
    if not o.fixed_shapes:
        return HEURISTIC_WORKSPACE
    cap = mem_limit_bytes(o)
    return MAX_WORKSPACE if cap is None else min(MAX_WORKSPACE, cap)


def cuda_options(o: ProviderOptions) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "device_id": str(o.device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE" if o.fixed_shapes else "HEURISTIC",
        # Max workspace lets EXHAUSTIVE find the fastest algorithm; without a fixed
        # shape it would keep GBs in the arena for every new shape's search.
        "cudnn_conv_use_max_workspace": "1" if o.fixed_shapes else "0",
        "prefer_nhwc": "1" if o.prefer_nhwc else "0",
        "use_tf32": "1" if o.tf32 else "0",
        "enable_cuda_graph": "1" if o.cuda_graph else "0",
        "do_copy_in_default_stream": "1",
        # Grow the arena by what is asked: shapes that vary must not double memory.
        "arena_extend_strategy": "kSameAsRequested",
    }
    limit = mem_limit_bytes(o)
    if limit is not None:
        opts["gpu_mem_limit"] = str(limit)
    if o.user_stream is not None:
        opts["has_user_compute_stream"] = "1"
        opts["user_compute_stream"] = str(o.user_stream)
    return opts


def torch_stream(device_id: int) -> int | None:
    """torch's current CUDA stream on ``device_id`` (an address), only if torch is
    already imported and has initialized CUDA: never imports torch, never creates a context."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.current_stream(device_id).cuda_stream)
    except Exception:  # a torch without CUDA, a device it does not see
        return None


def with_torch_stream(o: ProviderOptions) -> ProviderOptions:
    """``o`` with user_stream set to torch's current stream when it can be had."""
    if o.user_stream is not None or not o.share_torch_stream:
        return o
    stream = torch_stream(o.device_id)
    return o if stream is None else dataclasses.replace(o, user_stream=stream)


def tensorrt_options(o: ProviderOptions, inputs: ProfileInputs, model_key: str) -> dict[str, Any]:
    """TensorRT EP options; caches live under ``cache_dir/model_key`` so a different
    model, precision or profile never picks up a stale engine."""
    cache_root = o.cache_dir or os.path.join(default_cache_dir(), "tensorrt")
    tag = f"{model_key}-{'fp16' if o.fp16 else 'fp32'}-{_profile_tag(o.shapes)}"
    cache = os.path.join(cache_root, tag)
    opts: dict[str, Any] = {
        "device_id": str(o.device_id),
        "trt_fp16_enable": "1" if o.fp16 else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_engine_cache_prefix": "pe",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
        "trt_builder_optimization_level": "3",
        "trt_cuda_graph_enable": "1" if o.cuda_graph else "0",
    }
    opts.update(o.shapes.profile(inputs))
    if o.user_stream is not None:
        opts["has_user_compute_stream"] = "1"
        opts["user_compute_stream"] = str(o.user_stream)
    return opts


def _profile_tag(s: ShapeRange) -> str:
    return "_".join("x".join(map(str, t)) for t in (s.min, s.opt, s.max))


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PERCEPTUAL_ENGINE_CACHE") or os.path.join(base, "perceptual-engine")
