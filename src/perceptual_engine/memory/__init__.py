"""How much memory a call needs, and how much it may use.

``estimate`` computes an upper bound of a call's peak memory from the layer
table alone (channels and downsampling per layer): arithmetic, no allocation, a
few microseconds. ``MemoryGuard`` compares it with a budget (by default a
fraction of the memory available on the engine's device) before the call runs,
so a call that cannot fit is refused with the figures and the fix instead of
dying in the allocator. The model and its constants were measured on ONNX
Runtime's CPU provider; see docs/memory.md for the measurements.

The parts: estimator.py (``estimate``, its constants, ``MemoryEstimate``,
``format_bytes``, ``suggest_side``), oom.py (allocation failures ->
OutOfMemoryError). Their names are re-exported here, the path callers use
(``memory.estimate``, ``memory.TAP``). The budget, the reading of available memory and
``MemoryGuard`` are here: the guard reads ``available_memory`` through this module.
"""
from __future__ import annotations

import os
import re
import threading
import time

from ..errors import ConfigError, MemoryBudgetError
from .estimator import (ARENA, FIXED, GRAD_WORK, GRAM, IMAGES_PER_SAMPLE, MARGIN, TAP, WORK,
                       MemoryEstimate, estimate, format_bytes, itemsize, suggest_side)
from .oom import is_out_of_memory, out_of_memory

__all__ = [
    "DEFAULT_FRACTION", "CHECK_ABOVE", "AVAILABLE_TTL_S", "parse_budget", "available_memory",
    "MemoryGuard", "fit_batch",
    # estimator.py
    "IMAGES_PER_SAMPLE", "WORK", "TAP", "GRAM", "GRAD_WORK", "FIXED", "MARGIN", "ARENA",
    "MemoryEstimate", "itemsize", "estimate", "format_bytes", "suggest_side",
    # oom.py
    "is_out_of_memory", "out_of_memory",
]

DEFAULT_FRACTION = 0.8  # of MemAvailable (CPU) or free GPU memory: the default budget
CHECK_ABOVE = 256 << 20  # an automatic budget is not consulted for estimates below this
AVAILABLE_TTL_S = 1.0  # how long a reading of available memory is reused


# -- budgets --------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_budget(value) -> tuple[str, float]:
    """A memory budget as ("off", 0), ("bytes", n) or ("fraction", f).

    Accepted: None (the default: DEFAULT_FRACTION of the available memory);
    0, False, "0", "off", "none" (no budget); an int of bytes; a float in (0, 1]
    (a fraction of the available memory); a string "4G", "512M", "1.5GiB", "800K",
    "1000000" (binary units: 1G = 2**30 bytes) or "50%".
    """
    if value is None:
        return ("fraction", DEFAULT_FRACTION)
    if value is False or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return ("off", 0.0)
    if isinstance(value, bool):
        return ("fraction", DEFAULT_FRACTION)  # True: the default budget
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"memory budget {value} is negative; give bytes > 0, or 0 for no budget.")
        return ("bytes", float(value))
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"memory budget {value} as a float is a fraction of the available "
                              "memory; accepted: (0, 1]. Give bytes as an int, e.g. 4 * 2**30.")
        return ("fraction", value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("0", "off", "none", "no"):
            return ("off", 0.0)
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = -1.0
            if not 0.0 < pct <= 100.0:
                raise ConfigError(f"memory budget {value!r}: a percentage must be in (0, 100], e.g. 50%.")
            return ("fraction", pct / 100.0)
        m = _SIZE.match(text)
        if m:
            scale = 1 << (10 * " kmgt".index(m.group(2) or " "))
            n = float(m.group(1)) * scale
            if n >= 1:
                return ("bytes", float(int(n)))
    raise ConfigError(f"memory budget {value!r} is not accepted; accepted: a size such as 4G, "
                      "512M or 1.5GiB (binary units), a share such as 50% of the available "
                      "memory, or 0/off for no budget.")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None without one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory(device: str = "cpu", device_id: int = 0) -> int | None:
    """Bytes available to a new allocation on ``device`` ("cpu" or "cuda"), or None if unknown.

    CPU: MemAvailable from /proc/meminfo (else ``os.sysconf``), capped by the room
    under a cgroup v2 memory limit. CUDA: free memory of GPU ``device_id`` from the
    NVIDIA driver, in the primary context ONNX Runtime already uses (no torch
    import, no new CUDA context); None when the driver cannot tell.
    """
    if device == "cpu":
        avail = _meminfo_available()
        room = _cgroup_room()
        if avail is None:
            return room
        return avail if room is None else min(avail, room)
    try:
        from ..cuda_driver import free_memory

        return free_memory(device_id)
    except Exception:  # no driver: no budget, an OOM is still translated
        return None


class MemoryGuard:
    """A budget for one engine: ``check(estimate)`` raises MemoryBudgetError if over.

    budget: see ``parse_budget``. A fraction is of the memory available on ``device``,
    read when an estimate exceeds CHECK_ABOVE and reused for AVAILABLE_TTL_S (CPU);
    on a GPU it is read once, when first needed, and kept: ONNX Runtime's arena holds
    what earlier calls used, so later readings understate what this engine can use.
    An estimate no larger than one that already ran on this engine is let through
    with an automatic budget for the same reason.
    """

    def __init__(self, budget=None, device: str = "cpu", device_id: int = 0) -> None:
        self.kind, self.value = parse_budget(budget)
        self.device, self.device_id = device, device_id
        self._lock = threading.Lock()
        self._avail: tuple[float, int | None] | None = None  # (time read, bytes)
        self.largest_ok = 0

    def limit(self) -> int | None:
        """The budget in bytes now, or None (no budget, or available memory unknown)."""
        if self.kind == "off":
            return None
        if self.kind == "bytes":
            return int(self.value)
        with self._lock:
            now = time.monotonic()
            stale = self._avail is None or (self.device == "cpu" and now - self._avail[0] > AVAILABLE_TTL_S)
            if stale:
                self._avail = (now, available_memory(self.device, self.device_id))
            avail = self._avail[1]  # type: ignore[index]
        return None if avail is None else int(self.value * avail)

    def describe_limit(self, limit: int) -> str:
        if self.kind == "bytes":
            return f"the memory budget of {format_bytes(limit)}"
        where = "free GPU memory" if self.device != "cpu" else "available memory"
        return f"the memory budget of {format_bytes(limit)} ({self.value:.0%} of the {where})"

    def check(self, est: MemoryEstimate) -> None:
        if self.kind == "off":
            return
        if self.kind == "fraction" and (est.total <= CHECK_ABOVE or est.total <= self.largest_ok):
            return
        limit = self.limit()
        if limit is None or est.total <= limit:
            return
        raise MemoryBudgetError(
            f"this call needs {est.describe()}, over {self.describe_limit(limit)}. Use smaller "
            "images or a smaller batch, or raise the budget (Engine(memory_budget=...), e.g. "
            "'8G', or 0 for none).", estimate=est.total, budget=limit)

    def ran(self, est: MemoryEstimate) -> None:
        """Record an estimate that completed (see the class docstring)."""
        if est.total > self.largest_ok:
            self.largest_ok = est.total


def fit_batch(engine, height: int, width: int, most: int) -> int:
    """The largest batch n <= ``most`` of height x width whose estimate fits
    ``engine.memory_limit()``; at least 1 (a single call over the budget is refused
    by the engine itself, with the figures). Engines without an estimate: ``most``."""
    estimate_fn = getattr(engine, "estimate_memory", None)
    limit = engine.memory_limit() if estimate_fn is not None else None
    if limit is None:
        return most
    n = most
    while n > 1 and estimate_fn(n, height, width).total > limit:
        n -= 1
    return n
