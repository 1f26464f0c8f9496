"""The GPU libraries ONNX Runtime's providers load: whether TensorRT 10 loads (pip's
tensorrt_libs first), which CUDA runtime libraries the CUDA EP links and which pip
wheels bring them, and preloading them from the nvidia-* wheels."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Sequence


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
