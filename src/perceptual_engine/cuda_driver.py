"""The NVIDIA driver, asked directly through ctypes: GPU count and memory.

No torch and no CUDA runtime: a numpy user of a GPU Engine must not pay for a
torch import or a second CUDA context to learn how much memory is free. Memory
is read in the device's primary context, the one the CUDA runtime (and so ONNX
Runtime) already uses, retained and released around the query.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _lib() -> tuple[Any, str]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "the NVIDIA driver library libcuda.so.1 is not loadable (no GPU driver)"
    if lib.cuInit(0) != 0:
        return None, "cuInit failed: the NVIDIA driver found no usable GPU"
    return lib, ""


@functools.lru_cache(maxsize=1)
def gpu_count() -> tuple[int, str]:
    """(number of CUDA GPUs, reason when 0)."""
    lib, why = _lib()
    if lib is None:
        return 0, why
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no GPU"
    return count.value, ""


def _device(lib: Any, device_id: int) -> ctypes.c_int | None:
    dev = ctypes.c_int(0)
    return dev if lib.cuDeviceGet(ctypes.byref(dev), int(device_id)) == 0 else None


def total_memory(device_id: int = 0) -> int | None:
    """Bytes of memory on GPU ``device_id`` (no context needed), or None if unknown."""
    lib, _ = _lib()
    dev = _device(lib, device_id) if lib is not None else None
    if dev is None:
        return None
    size = ctypes.c_size_t(0)
    fn = getattr(lib, "cuDeviceTotalMem_v2", None) or lib.cuDeviceTotalMem
    return int(size.value) if fn(ctypes.byref(size), dev) == 0 else None


def free_memory(device_id: int = 0) -> int | None:
    """Free bytes on GPU ``device_id``, read in its primary context, or None if unknown."""
    lib, _ = _lib()
    dev = _device(lib, device_id) if lib is not None else None
    if dev is None:
        return None
    ctx = ctypes.c_void_p(0)
    if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
        return None
    try:
        if lib.cuCtxPushCurrent_v2(ctx) != 0:
            return None
        try:
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            if lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) != 0:
                return None
            return int(free.value)
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p(0)))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(dev)
