"""Timers, percentiles and memory probes: the measuring half of the benchmark.

Everything here is a plain function of its arguments (plus a probe of this
process), so the statistics are unit-tested on synthetic timings.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default "linear" method): rank (n-1)·q/100 in the sorted samples."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0..100")
    s = sorted(samples)
    rank = (len(s) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


@dataclass(frozen=True)
class Stats:
    """Latency statistics of one measured configuration, in milliseconds per call.

    ``throughput`` is items (images, or pairs for a distance) per second at the
    median latency: ``items_per_call / (p50 / 1000)``.
    """

    n: int
    p50: float
    p90: float | None  # None below MIN_SAMPLES[90] samples: too few to support it
    p99: float | None
    mean: float
    min: float
    max: float
    items_per_call: int
    throughput: float
    samples_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        return d


# A p-th percentile needs enough samples beyond it to mean anything: with 3 samples
# "p99" is just the maximum. Below these counts it is not reported.
MIN_SAMPLES = {90: 10, 99: 100}


def summarize(samples_ms: Sequence[float], items_per_call: int) -> Stats:
    """Median, p90, p99, mean, extremes and items/s of per-call latencies (ms)."""
    if not samples_ms:
        raise ValueError("no timing samples to summarize")
    if items_per_call < 1:
        raise ValueError(f"items_per_call is {items_per_call}; it must be >= 1")
    p50 = percentile(samples_ms, 50)
    return Stats(
        n=len(samples_ms),
        p50=p50,
        p90=percentile(samples_ms, 90) if len(samples_ms) >= MIN_SAMPLES[90] else None,
        p99=percentile(samples_ms, 99) if len(samples_ms) >= MIN_SAMPLES[99] else None,
        mean=sum(samples_ms) / len(samples_ms),
        min=min(samples_ms),
        max=max(samples_ms),
        items_per_call=items_per_call,
        throughput=items_per_call / (p50 / 1000.0) if p50 > 0 else float("inf"),
        samples_ms=tuple(float(s) for s in samples_ms),
    )


def time_calls(call: Callable[[int], Any], sync: Callable[[], None], *, n_sets: int,
               warmup: int, iters: int, clock: Callable[[], float] = time.perf_counter,
               start: int = 0) -> list[float]:
    """Per-call latencies in ms of ``call(i)`` over input sets rotated ``i % n_sets``.

    ``sync`` waits for all device work (torch.cuda.synchronize on a GPU; a no-op on
    the CPU): it runs before the clock starts and before it stops, so asynchronous
    work is counted in full and no earlier call leaks into a sample. Rotating the
    sets keeps a cache warm with one input from flattering the numbers.
    """
    if n_sets < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"n_sets={n_sets}, iters={iters}, warmup={warmup}: need n_sets, iters >= 1, warmup >= 0")
    for i in range(warmup):
        call((start + i) % n_sets)
    sync()
    out: list[float] = []
    for i in range(iters):
        k = (start + warmup + i) % n_sets
        sync()
        t0 = clock()
        call(k)
        sync()
        out.append((clock() - t0) * 1000.0)
    return out


# -- host memory ---------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (/proc), None where unknown."""
    try:
        import psutil  # type: ignore[import-not-found]

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        kb = _status_kb("VmRSS")
        return kb / 1024 if kb is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0:
    writing 5 to /proc/self/clear_refs). False where that is not possible, in
    which case ``peak_rss_mb`` is the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """High-water mark of this process's RSS in MiB (VmHWM, else getrusage)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


# -- GPU memory ----------------------------------------------------------------

def nvidia_smi_process_mb() -> float | None:
    """GPU memory this process holds, per nvidia-smi (MiB), or None if unknown.

    It counts everything the process holds on the GPU (ONNX Runtime's arena and
    torch's cache together), and sees nothing where the container hides PIDs.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pid = os.getpid()
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class Memory:
    """Memory of one measured configuration (MiB). ``gpu_source`` says how the GPU
    figure was obtained ("torch.cuda.max_memory_allocated", "nvidia-smi (process
    delta)", or "n/a")."""

    host_peak_mb: float | None
    host_delta_mb: float | None
    host_peak_since_start: bool
    gpu_mb: float | None
    gpu_source: str


class MemoryProbe:
    """Brackets one variant's run: host RSS high-water mark and GPU memory."""

    def __init__(self, torch_cuda: bool, smi: bool) -> None:
        self.torch_cuda = torch_cuda
        self.smi = smi

    def __enter__(self) -> "MemoryProbe":
        self.reset_ok = reset_peak_rss()
        self.rss0 = rss_mb()
        self.smi0 = nvidia_smi_process_mb() if self.smi else None
        if self.torch_cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.torch0 = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> Memory:
        peak = peak_rss_mb()
        delta = peak - self.rss0 if peak is not None and self.rss0 is not None and self.reset_ok else None
        gpu, source = None, "n/a"
        if self.torch_cuda:
            import torch

            torch.cuda.synchronize()
            gpu = (torch.cuda.max_memory_allocated() - self.torch0) / 2**20
            source = "torch.cuda.max_memory_allocated (delta)"
        elif self.smi:
            now = nvidia_smi_process_mb()
            if now is not None and self.smi0 is not None:
                gpu, source = now - self.smi0, "nvidia-smi (process delta, after the run)"
        return Memory(peak, delta, not self.reset_ok, gpu, source)


# -- environment -----------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    from importlib import metadata

    for dist in {"onnxruntime": ("onnxruntime-gpu", "onnxruntime")}.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def tf32_state() -> dict[str, Any]:
    """TF32 switches of torch as they stand (the baseline runs with these)."""
    import torch

    state: dict[str, Any] = {
        "torch.backends.cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "torch.backends.cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
    }
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:
        state["torch.backends.cudnn.conv.fp32_precision"] = conv
    return state


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: str, config: Any, spec: Any, weights: Any,
                variants: Sequence[Any]) -> dict[str, Any]:
    """Machine, versions, providers, TF32 settings, weights and command of a run."""
    import datetime
    import platform
    import sys

    import torch

    import onnxruntime as ort

    from .. import __version__

    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version()}
    ort_tf32 = {v.name: bool(v.use_tf32) for v in variants if getattr(v, "ep", "cpu") not in ("cpu", "openvino")}
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": gpu["name"] if gpu else cpu_model(),
        "gpu": gpu,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "matplotlib")}
        | {"perceptual-engine": __version__},
        "ort_providers": list(ort.get_available_providers()),
        "tf32": {"torch": tf32_state(), "ort use_tf32 by variant": ort_tf32,
                 "reference": "float32 PyTorch with TF32 off"},
        "weights": {"requested": config.weights, "source": weights.source, "sha256": weights.sha256},
        "spec": spec.to_dict() | {"deepest": spec.deepest},
        "command": config.command,
        "argv": list(sys.argv),
    }
