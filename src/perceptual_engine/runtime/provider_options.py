"""ProviderOptions, the knobs of the GPU providers, and the option dicts they become
for ONNX Runtime's CUDA and TensorRT execution providers (plus the memory the
estimate counts for cuDNN's workspace, and the stream ONNX Runtime runs on). DEFAULTS is
the one table of the GPU defaults and the evidence behind each.

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
class Default:
    """One row of DEFAULTS: a ProviderOptions knob, its default, and the evidence behind it."""

    option: str
    default: Any
    why: str
    change_if: str  # the measurement that would change the default


# The GPU defaults, in one place (docs/gpu.md shows this table; tests check it against the
# dataclass). ORT 1.20+ runs Conv through the cuDNN frontend (FE): read the "why" with that.
DEFAULTS: tuple[Default, ...] = (
    Default("fixed_shapes", False,
            "cudnn_conv_algo_search HEURISTIC; True: EXHAUSTIVE. Since ORT 1.20 both only pick the "
            "cuDNN-FE heuristic mode (A or B) once per shape, nothing is timed; the workspace is the "
            "plan's either way (cudnn_conv_use_max_workspace is not read by the FE Conv path), so "
            "the option changes no memory",
            "scripts/gpu_check.py --ab: the B rows faster than A at 224², batch 8"),
    Default("tf32", True,
            "as PyTorch's cuDNN default; False gives strict float32 convolutions and MatMuls. Never "
            "applied to a float16 model: ORT's FE conv path deselects every tensor-core engine when "
            "use_tf32=0, float16 included (for_model)",
            "nothing measured: strict float32 parity is the reason to turn it off"),
    Default("prefer_nhwc", False,
            "NCHW: the one NHWC run (H200, ORT 1.31.1, tensor cores off by use_tf32=0) was 2.2x "
            "slower than NCHW on float16 features",
            "the A/B's nhwc rows, with tensor cores and fuse_conv_bias, faster than nchw"),
    Default("fuse_conv_bias", False,
            "ORT's default: the bias is a separate cudnnAddTensor; with 1 the FE graph adds it "
            "in the convolution's epilogue (in NCHW at the cost of a memset of the output per call)",
            "the A/B's +bias rows faster (expected in NHWC, ORT #21752 plans it as the default)"),
    Default("cuda_graph", False,
            "capture needs one fixed shape and IO binding; the Engine captures in a second session",
            "stays opt-in: it is a per-shape promise the caller makes"),
    Default("gpu_mem_limit", 0.5,
            "half the GPU: ONNX Runtime's arena never shrinks, torch in the process needs room",
            "a process that runs only the Engine can pass None"),
    Default("share_torch_stream", False,
            "an H200 run read wrong Reshape shapes on torch's stream (scripts/gpu_stream_check.py)",
            "gpu_stream_check.py passing on the exported graphs without integer shape arithmetic"),
)

BOOL_OPTIONS = ("fixed_shapes", "tf32", "prefer_nhwc", "fuse_conv_bias", "cuda_graph", "fp16",
                "share_torch_stream")


@dataclass(frozen=True)
class ProviderOptions:
    """Knobs for the GPU providers; the defaults and why: DEFAULTS above (docs/gpu.md).

    fixed_shapes: inputs keep one shape -> cuDNN EXHAUSTIVE algorithm choice (since
        ONNX Runtime 1.20: the cuDNN-frontend heuristic mode B, once per shape),
        the CPU arena on; False -> HEURISTIC (mode A).
    tf32: allow TF32 tensor-core math for float32 (faster, ~1e-3 relative error).
        Ignored (forced on) for a float16 model: see ``for_model``.
    prefer_nhwc: CUDA EP runs convolutions and pools in NHWC (transposes at the
        layout boundaries).
    fuse_conv_bias: the CUDA EP adds the convolution's bias inside the cuDNN-frontend
        graph instead of a separate pass.
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
    fuse_conv_bias: bool = False
    cuda_graph: bool = False
    fp16: bool = False
    cache_dir: str | None = None
    shapes: ShapeRange = field(default_factory=ShapeRange)
    gpu_mem_limit: int | float | None = 0.5
    user_stream: int | None = None
    share_torch_stream: bool = False

    def __post_init__(self) -> None:
        for name in BOOL_OPTIONS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} is not accepted; accepted: True or False. "
                                  f"Pass ProviderOptions({name}=True) or ({name}=False).")
        m = self.gpu_mem_limit
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0
                              or (isinstance(m, float) and m > 1)):
            raise ConfigError(f"gpu_mem_limit={m!r} is not accepted; accepted: bytes (int > 0), a "
                              "fraction of the GPU's memory (float in (0, 1]) or None (no cap).")


FP16_TENSOR_CORES = ("tf32=False is not applied to this float16 model: ONNX Runtime's cuDNN-frontend "
                     "convolutions drop every tensor-core engine when use_tf32=0, float16 included, so "
                     "use_tf32=1 is passed (float16 convolutions stay on tensor cores; the model's "
                     "few float32 ops may use TF32, whose error is under the float16 tier of 1e-2)")


def for_model(o: ProviderOptions, dtype: str) -> tuple[ProviderOptions, tuple[str, ...]]:
    """The options a model of ``dtype`` ("float32" | "float16") really runs with, and notes
    on what was changed. A float16 model always gets ``tf32=True``: since ONNX Runtime 1.20,
    ``use_tf32=0`` makes the cuDNN-frontend Conv path deselect tensor cores for every data
    type (nn/conv.cc, nn/conv_transpose.cc), which would run float16 convolutions on CUDA
    cores. TF32 itself only concerns float32 math."""
    if dtype == "float16" and not o.tf32:
        return dataclasses.replace(o, tf32=True), (FP16_TENSOR_CORES,)
    return o, ()


# What cuDNN's convolution workspace is counted at in the memory estimate (bytes), for every
# option: since ONNX Runtime 1.20 the cuDNN-frontend Conv path sizes it by the plan it picks
# and does not read cudnn_conv_use_max_workspace (docs/gpu.md). A bound, not a measurement:
# scripts/gpu_check.py records the GPU memory each engine takes (stage layout).
CONV_WORKSPACE = 256 << 20


def mem_limit_bytes(o: ProviderOptions) -> int | None:
    """``o.gpu_mem_limit`` in bytes (a fraction is of the GPU's total memory)."""
    m = o.gpu_mem_limit
    if m is None or isinstance(m, int):
        return m
    from ..cuda_driver import total_memory

    total = total_memory(o.device_id)
    return None if total is None else int(total * m)


def workspace_bytes(o: ProviderOptions) -> int:
    """What cuDNN's convolution workspace is counted at in the memory estimate: CONV_WORKSPACE
    whatever the options (fixed_shapes no longer asks for a larger one), within the arena cap."""
    cap = mem_limit_bytes(o)
    return CONV_WORKSPACE if cap is None else min(CONV_WORKSPACE, cap)


def cuda_options(o: ProviderOptions) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "device_id": str(o.device_id),
        # Since ORT 1.20: the cuDNN-frontend heuristic mode B (EXHAUSTIVE) or A (HEURISTIC).
        "cudnn_conv_algo_search": "EXHAUSTIVE" if o.fixed_shapes else "HEURISTIC",
        # Not read by the cuDNN-frontend Conv path; 0 bounds any legacy cuDNN call.
        "cudnn_conv_use_max_workspace": "0",
        "prefer_nhwc": "1" if o.prefer_nhwc else "0",
        "fuse_conv_bias": "1" if o.fuse_conv_bias else "0",
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
