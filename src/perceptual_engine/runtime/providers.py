"""Which ONNX Runtime execution providers a device means, with which options.

Pure functions of their arguments (plus a probe of the machine), so the option
assembly for CUDA and TensorRT is unit-tested on machines without a GPU.

``plan`` is here; the option types and dicts are in provider_options.py, the
TensorRT profiles in profiles.py, the library probes in gpu_libs.py. Their names are
re-exported here, the path callers use (``providers.ProviderOptions``); ``plan``
calls the probes through this module's names, so replacing one here replaces it for ``plan``.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError, DeviceError
from .gpu_libs import (CUDA_WHEELS, TENSORRT_LIBS, cuda_libraries, cuda_wheels,
                       missing_cuda_libraries, ort_cuda_major, preload_cuda, tensorrt_lib_dirs,
                       tensorrt_loadable)
from .profiles import ProfileInput, ProfileInputs, ShapeRange, profile_inputs
from .provider_options import (CONV_WORKSPACE, DEFAULTS, ProviderOptions, cuda_options,
                               default_cache_dir, for_model, mem_limit_bytes, tensorrt_options,
                               torch_stream, with_torch_stream, workspace_bytes)

__all__ = [
    "DEVICES", "PROVIDER", "plan", "cuda_gpu_count", "available_providers",
    # profiles.py
    "ProfileInput", "ProfileInputs", "profile_inputs", "ShapeRange",
    # provider_options.py
    "ProviderOptions", "DEFAULTS", "CONV_WORKSPACE", "for_model", "mem_limit_bytes",
    "workspace_bytes", "cuda_options", "tensorrt_options", "default_cache_dir",
    "torch_stream", "with_torch_stream",
    # gpu_libs.py
    "TENSORRT_LIBS", "tensorrt_lib_dirs", "tensorrt_loadable", "CUDA_WHEELS", "ort_cuda_major",
    "cuda_libraries", "missing_cuda_libraries", "cuda_wheels", "preload_cuda",
]

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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

