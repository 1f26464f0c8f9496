"""Which ONNX Runtime execution providers a device means, with which options.

Pure functions of their arguments (plus a probe of the machine), so the option
assembly for CUDA and TensorRT is unit-tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from .. import layers as _layers
from ..errors import ConfigError, DeviceError

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class ProfileInput:
    """A dynamic graph input TensorRT needs a profile for: ``batched`` image inputs
    are (N, channels, H, W); a target graph's cached content features are
    (1, channels, H/downsample, W/downsample), following the image's size."""

    name: str
    channels: int = 3
    downsample: int = 1
    batched: bool = True


ProfileInputs = Sequence[Union[str, ProfileInput]]


def profile_inputs(arch: str, names: Sequence[str]) -> list[ProfileInput]:
    """The inputs of a graph with dynamic shapes, as the TensorRT profile needs them.

    ``x``/``y`` are images; ``target.content.<l>`` follow x's size at layer l;
    ``target.gram.<l>`` are (1, C, C), static, and need no profile. ONNX Runtime's
    TensorRT EP refuses a session whose explicit profile misses a dynamic input.
    """
    out = []
    for name in names:
        if name in ("x", "y"):
            out.append(ProfileInput(name))
        elif name.startswith("target.content."):
            info = _layers.resolve(arch, name[len("target.content."):])
            out.append(ProfileInput(name, info.channels, info.downsample, batched=False))
    return out


@dataclass(frozen=True)
class ShapeRange:
    """TensorRT optimization profile: (N, H, W) min/opt/max of every image input.

    TensorRT builds its engine for the whole range when the session starts and
    sizes its memory by ``max``; the default (up to 8 images of 512x512) builds in
    reasonable time and memory. Widen it for larger inputs, e.g.
    ``ProviderOptions(shapes=ShapeRange(max=(16, 1024, 1024)))`` (docs/gpu.md).
    """

    min: tuple[int, int, int] = (1, 32, 32)
    opt: tuple[int, int, int] = (1, 224, 224)
    max: tuple[int, int, int] = (8, 512, 512)

    def __post_init__(self) -> None:
        for a, b in ((self.min, self.opt), (self.opt, self.max)):
            if len(a) != 3 or len(b) != 3 or any(i > j for i, j in zip(a, b)):
                raise ConfigError(
                    f"shape range min {self.min} <= opt {self.opt} <= max {self.max} does not "
                    "hold; give (batch, height, width) triples ordered element-wise."
                )

    def profile(self, inputs: ProfileInputs) -> dict[str, str]:
        """trt_profile_{min,opt,max}_shapes for every input (a plain name is an image)."""
        specs = [ProfileInput(i) if isinstance(i, str) else i for i in inputs]

        def fmt(nhw: tuple[int, int, int]) -> str:
            n, h, w = nhw
            return ",".join(f"{i.name}:{n if i.batched else 1}x{i.channels}x"
                            f"{max(h // i.downsample, 1)}x{max(w // i.downsample, 1)}" for i in specs)

        return {
            "trt_profile_min_shapes": fmt(self.min),
            "trt_profile_opt_shapes": fmt(self.opt),
            "trt_profile_max_shapes": fmt(self.max),
        }


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


def cuda_gpu_count() -> tuple[int, str]:
    """(number of CUDA GPUs, reason when 0), asked of the driver without ONNX Runtime."""
    from ..cuda_driver import gpu_count

    return gpu_count()


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def plan(device: str, options: ProviderOptions, inputs: ProfileInputs,
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
                f"CUDA version (pip install 'tensorrt-cu{ort_cuda_major() or 13}-libs<11', or NVIDIA's "
                "packages with their folder on LD_LIBRARY_PATH) or use device='cuda'."
            )
        return [(name, tensorrt_options(options, inputs, model_key())),
                (PROVIDER["cuda"], cuda_options(options)), cpu]
    return [(name, cuda_options(options)), cpu]


# What the TensorRT EP loads: TensorRT's runtime, its ONNX parser (both NEEDED by
# libonnxruntime_providers_tensorrt.so) and its plugins, TensorRT 10.
TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def tensorrt_lib_dirs() -> list[str]:
    """Folders of pip's TensorRT libraries (tensorrt-cu13-libs / -cu12-libs put them in
    site-packages/tensorrt_libs, which is not on the loader's path)."""
    dirs = []
    for root in sys.path:
        d = os.path.join(root or ".", "tensorrt_libs")
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def tensorrt_loadable() -> tuple[bool, str]:
    """Whether every TensorRT 10 library the TensorRT EP needs loads.

    pip's tensorrt_libs folder comes first: its libraries are loaded by absolute
    path with RTLD_GLOBAL, so the EP's later load by soname finds them. Then the
    loader's own path (a system TensorRT, LD_LIBRARY_PATH).
    """
    missing = []
    for lib in TENSORRT_LIBS:
        for d in tensorrt_lib_dirs():
            path = os.path.join(d, lib)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    pass
        else:
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                missing.append(f"{lib} is not loadable: {exc}")
    if missing:
        return False, "; ".join(missing)
    return True, ""


# The pip wheel that provides each library the CUDA EP links. CUDA 13's wheels
# dropped the -cu13 suffix (cuDNN's kept it); CUDA 12's carry -cu12.
CUDA_WHEELS = {
    "libcudart": "nvidia-cuda-runtime",
    "libcublas": "nvidia-cublas",
    "libcublasLt": "nvidia-cublas",
    "libcurand": "nvidia-curand",
    "libcudnn": "nvidia-cudnn",
}


def ort_cuda_major() -> int | None:
    """The CUDA major version this onnxruntime build was made for, or None (a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except Exception:
        return None
    try:
        return int(str(getattr(info, "cuda_version", "") or "").split(".")[0])
    except ValueError:
        return None


def cuda_libraries(major: int) -> tuple[str, ...]:
    """What libonnxruntime_providers_cuda.so needs (readelf -d) plus cuDNN, which it
    opens at run time: curand's soname is .so.10 for CUDA 12 and 13 alike."""
    return (f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}",
            "libcurand.so.10", "libcudnn.so.9")


def missing_cuda_libraries(major: int | None = None) -> list[str]:
    """CUDA runtime libraries the CUDA EP links that cannot be loaded (for error messages)."""
    major = major or ort_cuda_major()
    if major is None:
        return []
    missing = []
    for lib in cuda_libraries(major):
        try:
            ctypes.CDLL(lib)
        except OSError:
            missing.append(lib)
    return missing


def cuda_wheels(missing: Sequence[str], major: int | None = None) -> list[str]:
    major = major or ort_cuda_major() or 13
    names = {CUDA_WHEELS[lib.split(".so")[0]] for lib in missing}
    return sorted(f"{n}-cu{major}" if major < 13 or n == "nvidia-cudnn" else n for n in names)


def preload_cuda() -> None:
    """onnxruntime.preload_dlls(): CUDA/cuDNN from the nvidia-* wheels torch brings.

    It prints what it fails to load with print(): sent to stderr, so a command's
    stdout (results, JSON) stays clean. A missing library is diagnosed later,
    by the provider's failure to start.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(sys.stderr):
        try:
            preload()
        except Exception:
            pass
