"""Out of memory: recognizing an allocation failure (ONNX Runtime, CUDA, Python's
MemoryError) and the OutOfMemoryError that replaces it, with the figures and the fix."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import OutOfMemoryError

if TYPE_CHECKING:
    from .estimator import MemoryEstimate

_OOM_PATTERNS = ("bad_alloc", "failed to allocate memory", "out of memory",
                 "cudaerrormemoryallocation", "cuda_error_out_of_memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Is ``exc`` an allocation failure (ONNX Runtime, CUDA, or Python's MemoryError)?"""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(p in text for p in _OOM_PATTERNS)


def out_of_memory(exc: BaseException, est: MemoryEstimate | None, where: str) -> OutOfMemoryError:
    """The OutOfMemoryError for an allocation failure ``exc`` during a call on ``where``."""
    need = f" It needed {est.describe()}." if est is not None else ""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return OutOfMemoryError(
        f"ONNX Runtime ran out of memory on {where} ({first}).{need} Use smaller images or a "
        "smaller batch, free memory, or set a memory budget so such calls are refused before "
        "they run (Engine(memory_budget=...)).", estimate=None if est is None else est.total)
