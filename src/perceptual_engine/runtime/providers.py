"""Which ONNX Runtime execution providers a device means, with which options.

Pure functions of their arguments (plus a probe of the machine), so the option
assembly for CUDA and TensorRT is unit-tested on machines without a GPU.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ConfigError, DeviceError

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class ShapeRange:
    """TensorRT optimization profile: (N, H, W) min/opt/max of every image input."""

    min: tuple[int, int, int] = (1, 32, 32)
    opt: tuple[int, int, int] = (1, 224, 224)
    max: tuple[int, int, int] = (32, 1024, 1024)

    def __post_init__(self) -> None:
        for a, b in ((self.min, self.opt), (self.opt, self.max)):
            if len(a) != 3 or len(b) != 3 or any(i > j for i, j in zip(a, b)):
                raise ConfigError(
                    f"shape range min {self.min} <= opt {self.opt} <= max {self.max} does not "
                    "hold; give (batch, height, width) triples ordered element-wise."
                )

    def profile(self, inputs: Sequence[str]) -> dict[str, str]:
        def fmt(nhw: tuple[int, int, int]) -> str:
            n, h, w = nhw
            return ",".join(f"{name}:{n}x3x{h}x{w}" for name in inputs)

        return {
            "trt_profile_min_shapes": fmt(self.min),
            "trt_profile_opt_shapes": fmt(self.opt),
            "trt_profile_max_shapes": fmt(self.max),
        }


@dataclass(frozen=True)
class ProviderOptions:
    """Knobs for the GPU providers; defaults are the fast, documented choices.

    fixed_shapes: inputs keep one shape -> cuDNN EXHAUSTIVE algorithm search
        (slow first call, fastest after); False -> HEURISTIC (no re-search per shape).
    tf32: allow TF32 tensor-core math for float32 (faster, ~1e-3 relative error).
    prefer_nhwc: CUDA EP runs convolutions in NHWC (tensor-core friendly layout).
    cuda_graph: capture the whole run as a CUDA graph (needs fixed shapes and IO binding).
    fp16: TensorRT builds float16 kernels (where TensorRT 10 still has the flag).
    cache_dir: where TensorRT engine and timing caches live (keyed by model hash).
    shapes: TensorRT optimization profile.
    """

    device_id: int = 0
    fixed_shapes: bool = False
    tf32: bool = True
    prefer_nhwc: bool = True
    cuda_graph: bool = False
    fp16: bool = False
    cache_dir: str | None = None
    shapes: ShapeRange = field(default_factory=ShapeRange)
    gpu_mem_limit: int | None = None
    user_stream: int | None = None  # a cudaStream_t address to share with torch


def cuda_options(o: ProviderOptions) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "device_id": str(o.device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE" if o.fixed_shapes else "HEURISTIC",
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "1" if o.prefer_nhwc else "0",
        "use_tf32": "1" if o.tf32 else "0",
        "enable_cuda_graph": "1" if o.cuda_graph else "0",
        "do_copy_in_default_stream": "1",
        # Grow the arena by what is asked: shapes that vary must not double memory.
        "arena_extend_strategy": "kSameAsRequested",
    }
    if o.gpu_mem_limit is not None:
        opts["gpu_mem_limit"] = str(o.gpu_mem_limit)
    if o.user_stream is not None:
        opts["has_user_compute_stream"] = "1"
        opts["user_compute_stream"] = str(o.user_stream)
    return opts


def tensorrt_options(o: ProviderOptions, inputs: Sequence[str], model_key: str) -> dict[str, Any]:
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


@functools.lru_cache(maxsize=1)
def cuda_gpu_count() -> tuple[int, str]:
    """(number of CUDA GPUs, reason when 0), asked of the driver without ONNX Runtime."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "the NVIDIA driver library libcuda.so.1 is not loadable (no GPU driver)"
    if lib.cuInit(0) != 0:
        return 0, "cuInit failed: the NVIDIA driver found no usable GPU"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no GPU"
    return count.value, ""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def plan(device: str, options: ProviderOptions, inputs: Sequence[str],
         model_key: Callable[[], str]) -> list[tuple[str, dict[str, Any]]]:
    """The provider list for a device, or DeviceError saying why it cannot be had.

    "auto" tries TensorRT, CUDA, CPU in turn; on a machine without a GPU it goes
    straight to CPU. CPU ends every list because ONNX Runtime places small shape
    computations there; the Engine then checks that the requested GPU provider is
    the one the session really runs, so a GPU request never becomes a CPU run.
    """
    if device not in DEVICES:
        raise ConfigError(f"device {device!r} is not accepted; accepted: {', '.join(DEVICES)}.")
    cpu = ("CPUExecutionProvider", {})
    if device == "cpu":
        return [cpu]
    have = available_providers()
    gpus, why = cuda_gpu_count()
    if device == "auto":
        if gpus == 0:
            return [cpu]
        chain = []
        if PROVIDER["tensorrt"] in have and tensorrt_loadable()[0]:
            chain.append((PROVIDER["tensorrt"], tensorrt_options(options, inputs, model_key())))
        if PROVIDER["cuda"] in have:
            chain.append((PROVIDER["cuda"], cuda_options(options)))
        return chain + [cpu]
    name = PROVIDER[device]
    if name not in have:
        raise DeviceError(
            f"device {device!r} needs {name}, but this onnxruntime build offers {have}. "
            "Install onnxruntime-gpu (pip install onnxruntime-gpu), or use device='cpu'."
        )
    if gpus == 0:
        raise DeviceError(f"device {device!r} needs a CUDA GPU, but {why}. Use device='cpu'.")
    if device == "tensorrt":
        ok, why_trt = tensorrt_loadable()
        if not ok:
            raise DeviceError(
                f"device 'tensorrt' needs TensorRT 10 ({why_trt}). Install it for onnxruntime's "
                "CUDA version (pip install tensorrt-cu13-libs for a CUDA 13 build, tensorrt-cu12-libs "
                "for CUDA 12, or NVIDIA's packages) or use device='cuda'."
            )
        return [(name, tensorrt_options(options, inputs, model_key())),
                (PROVIDER["cuda"], cuda_options(options)), cpu]
    return [(name, cuda_options(options)), cpu]


def tensorrt_loadable() -> tuple[bool, str]:
    """Whether TensorRT 10's runtime library loads (the TensorRT EP needs it)."""
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError as exc:
        return False, f"libnvinfer.so.10 is not loadable: {exc}"
    return True, ""


# The pip wheel that provides each library the CUDA EP of a CUDA 13 onnxruntime links.
CUDA_WHEELS = {
    "libcudart": "nvidia-cuda-runtime",
    "libcublas": "nvidia-cublas",
    "libcublasLt": "nvidia-cublas",
    "libcudnn": "nvidia-cudnn-cu13",
}


def missing_cuda_libraries() -> list[str]:
    """CUDA runtime libraries the CUDA EP links that cannot be loaded (for error messages)."""
    missing = []
    # onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9.
    for lib in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            missing.append(lib)
    return missing
