"""How much memory a call needs, and how much it may use.

``estimate`` computes an upper bound of a call's peak memory from the layer
table alone (channels and downsampling per layer): arithmetic, no allocation, a
few microseconds. ``MemoryGuard`` compares it with a budget (by default a
fraction of the memory available on the engine's device) before the call runs,
so a call that cannot fit is refused with the figures and the fix instead of
dying in the allocator. The model and its constants were measured on ONNX
Runtime's CPU provider; see docs/memory.md for the measurements.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from . import kinds, layers as _layers
from .errors import ConfigError, MemoryBudgetError, OutOfMemoryError

DEFAULT_FRACTION = 0.8  # of MemAvailable (CPU) or free GPU memory: the default budget
CHECK_ABOVE = 256 << 20  # an automatic budget is not consulted for estimates below this
AVAILABLE_TTL_S = 1.0  # how long a reading of available memory is reused

# Images through the network per sample, by graph kind (kinds.py): a pair graph runs
# x and y as one batch of 2N.
IMAGES_PER_SAMPLE: dict[str, int] = {k.name: k.images for k in kinds.KINDS.values()}

# Calibration (docs/memory.md). WORK: live activation tensors while a convolution
# runs (its input and output). TAP: copies held per tapped layer, fitted per graph
# kind (a features graph returns every tap, so all stay alive; a distance graph's
# loss consumes them sooner). GRAM: copies made per image to compute a style layer's
# Gram (the feature scaled, flattened and transposed), alive while it is computed.
# GRAD_WORK: the backward's tensors per differentiated image (x only, never y), as a
# multiple of every activation of the network, on top of the saved activations.
# GRAM and GRAD_WORK were fitted on shallow models at 256² and 512² (docs/memory.md);
# ARENA on a GPU is not measured yet: a conservative guess.
WORK = 2.0
TAP = {k.name: k.tap_factor for k in kinds.KINDS.values()}
GRAM = 1.5
GRAD_WORK = 2.0
FIXED = 16 << 20  # per call, whatever the size: small buffers, the outputs, allocator slack
MARGIN = 1.10  # the bound is the model times this
ARENA = 1.25  # ONNX Runtime's memory arena (CPU arena on, or any GPU) rounds and keeps blocks


@dataclass(frozen=True)
class MemoryEstimate:
    """An upper bound of one call's peak memory, in bytes, and how it was reached.

    ``images``: images through the network (N, or 2N for a pair graph);
    ``peak_layer``: where the forward's working set peaks; ``total``: the bound.
    """

    total: int
    images: int
    height: int
    width: int
    graph: str
    dtype: str
    grad: bool
    deepest: str
    peak_layer: str
    grams: tuple[str, ...] = ()

    def describe(self) -> str:
        what = f"{self.images} image(s) of {self.height}x{self.width} through {self.deepest}"
        return (f"about {format_bytes(self.total)} ({what}, {self.graph} graph, {self.dtype}"
                f"{', with gradient' if self.grad else ''})")


def itemsize(dtype: str, device: str = "cpu") -> int:
    """Bytes per activation element. On ONNX Runtime's CPU provider a float16 model
    was measured to take as much memory as a float32 one (docs/memory.md), so it is
    costed at 4 bytes there; on a GPU float16 halves the activations."""
    if dtype == "float16" and device != "cpu":
        return 2
    if dtype in ("float32", "float16"):
        return 4
    raise ConfigError(f"dtype {dtype!r} is not accepted; accepted: 'float32', 'float16'.")


@lru_cache(maxsize=4096)  # a call's check is then a dictionary lookup
def estimate(spec, graph: str, n: int, height: int, width: int, *, dtype: str = "float32",
             grad: bool = False, taps: tuple[str, ...] | None = None,
             device: str = "cpu", arena: bool = False, workspace: int = 0,
             sessions: int = 1, grams: tuple[str, ...] = ()) -> MemoryEstimate:
    """Upper bound of the peak memory of one call, in bytes.

    spec: the FeatureSpec (arch, layers: the network is cut after the deepest).
    graph: the graph kind ("features", "distance", "style", "target", "lpips", ...).
    n, height, width: the batch and the input size in pixels.
    taps: the layers whose outputs the graph keeps (default: ``spec.layers``).
    grams: the style layers, whose Gram matrices the graph computes (the loss's
        ``style``; none for features and LPIPS graphs).
    grad: the graph also computes a gradient of x (every activation is kept for the
        backward).
    device: "cpu" or a GPU ("cuda"); arena: ONNX Runtime allocates from its memory
        arena (the CPU arena when on, always on a GPU).
    workspace: GPU only, bytes cuDNN's convolution workspace may take (an arena
        block that is kept); sessions: GPU only, sessions holding activations (2
        with a CUDA graph: the captured session has its own arena).

    With B images through the network (N, or 2N for pair graphs), s bytes per
    element (``itemsize``), e_l = C_l·⌊H/d_l⌋·⌊W/d_l⌋ the elements of layer l per
    image (channels C_l and downsampling d_l from the layer table), [l ∈ grams] 1 at
    a style layer and 0 elsewhere:

        forward = s·B·max_l (WORK·e_l + Σ_{tap t ≤ l} TAP[graph]·e_t + GRAM·[l ∈ grams]·e_l)
        grad    = s·(B·Σ_l e_l + N·(GRAD_WORK·Σ_l e_l + GRAM·Σ_{g ∈ grams} e_g))
                  (replaces forward; only x, N images, is differentiated)
        inputs  = 4·B·3·H·W·2      (the caller's arrays and the normalized copy)
        total   = MARGIN·A·(S·(forward or grad) + inputs) + W + FIXED
                  with A = ARENA when an arena allocates (``arena``, or a GPU), else 1,
                  S = sessions and W = workspace (both on a GPU only; 1 and 0 on CPU)

    l runs over the conv, ReLU and pool layers up to the deepest. The constants
    are measured (docs/memory.md): the bound is above the measured peak RSS of ONNX
    Runtime CPU calls of every graph kind, with and without a gradient.
    """
    images = n * IMAGES_PER_SAMPLE.get(graph, 2)
    styled = set(grams)
    size = itemsize(dtype, device)
    tapped = set(spec.layers if taps is None else taps)
    tap_factor = TAP.get(graph, max(TAP.values()))
    layers = _layers.table(spec.arch)[: _layers.deepest(spec.arch, spec.layers).index + 1]
    held = 0.0  # tap copies accumulated so far, elements per image
    total_act, gram_act, worst, worst_at = 0, 0, 0.0, layers[0].name
    for info in layers:
        e = info.channels * (height // info.downsample) * (width // info.downsample)
        if info.name in tapped:
            held += tap_factor * e
        live = WORK * e + held
        if info.name in styled:  # its Gram is computed while the tap is held
            live += GRAM * e
            gram_act += e
        if live > worst:
            worst, worst_at = live, info.name
        total_act += e
    if grad:
        body = size * (images * total_act + n * (GRAD_WORK * total_act + GRAM * gram_act))
    else:
        body = size * images * worst
    inputs = 4 * images * 3 * height * width * 2
    pool = ARENA if (arena or device != "cpu") else 1.0
    if device == "cpu":
        workspace, sessions = 0, 1
    total = int(MARGIN * pool * (sessions * body + inputs)) + int(workspace) + FIXED
    return MemoryEstimate(total, images, height, width, graph, dtype, grad,
                          layers[-1].name, worst_at, tuple(grams))


# -- budgets --------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as --memory-budget reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


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
        from .cuda_driver import free_memory

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


def suggest_side(height: int, width: int, estimate: int, budget: int) -> int | None:
    """A longer side (a multiple of 32) at which a call estimated at ``estimate`` for
    height x width would fit ``budget``; None if none would. The estimate grows with
    the pixel count, so the side scales with the square root of the ratio."""
    if estimate <= FIXED or budget <= FIXED:
        return None
    side = int(max(height, width) * ((budget - FIXED) / (estimate - FIXED)) ** 0.5) // 32 * 32
    return side if side >= 32 else None


# -- out of memory ----------------------------------------------------------------------
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
