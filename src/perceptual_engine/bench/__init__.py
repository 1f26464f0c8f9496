"""The benchmark: every variant on the same inputs, in one run, returned as data.

    from perceptual_engine.bench import BenchConfig, run
    result = run(BenchConfig(workloads=("distance",), sizes=(224,), batch_sizes=(4,),
                             variants=("torch-eager-fp32", "ort-cpu"), quick=True))
    from perceptual_engine.bench.report import to_markdown, to_json, to_png

``run`` prints nothing (pass ``progress=print`` to follow it). For each workload,
size and batch it makes seeded input sets, computes the float32 PyTorch reference
(TF32 off) on the first set, then for each variant: builds it and runs it once
(the cold start, which also gives the output checked against the reference),
warms up, and times calls over the rotated sets.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import ConfigError, DeviceError
from ..spec import FeatureSpec
from . import harness, variants as V, workloads as W
from .flops import Peak, ceilings
from .harness import Memory, Stats
from .variants import BASELINE, TOLERANCE

__all__ = ["BenchConfig", "BenchResult", "Row", "run", "BASELINE", "TOLERANCE"]

QUICK = {"workloads": ("features", "distance"), "sizes": (224,), "batch_sizes": (1, 4),
         "iters": 3, "warmup": 1}
# lpips is opt-in (--workloads lpips): it runs VGG16 to relu5_3 and needs the lpips package.
FULL = {"workloads": ("features", "distance", "style", "train", "stylize-step"), "sizes": (224, 512), "batch_sizes": (1, 8, 32),
        "iters": 20, "warmup": 3}
# Sizes and batches of the gradient workloads where the config names none: a training
# step at 224², an optimization step at 512² (batch 1); small under --quick.
POINTS = {"train": {"full": ((224,), (1, 8, 32)), "quick": ((64,), (1,))},
          "stylize-step": {"full": ((512,), (1,)), "quick": ((64,), (1,))}}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``None`` fields take the defaults of ``quick`` (QUICK) or of
    a full run (FULL); ``variants=None`` means every variant. ``weights``: "random"
    (seeded; the default, no download), "imagenet" or a weights file."""

    workloads: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    variants: tuple[str, ...] | None = None
    device: str = "auto"  # "auto" | "cpu" | "cuda": where torch and GPU variants run
    iters: int | None = None
    warmup: int | None = None
    input_sets: int = 3
    quick: bool = False
    weights: str = "random"
    arch: str = "vgg19"
    layers: tuple[str, ...] | None = None
    seed: int = 0
    cache_dir: str | None = None  # where exported models (and TensorRT caches) are kept
    measure_peak: bool = True
    command: str | None = None  # the command line, recorded in the environment

    def __post_init__(self) -> None:
        object.__setattr__(self, "_given", (self.sizes is not None, self.batch_sizes is not None))
        base = QUICK if self.quick else FULL
        for name in ("workloads", "sizes", "batch_sizes", "iters", "warmup"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, base[name])
        if self.variants is None:
            object.__setattr__(self, "variants", tuple(V.REGISTRY))
        for name in ("workloads", "sizes", "batch_sizes", "variants"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for w in self.workloads:  # type: ignore[union-attr]
            W.get(w)
        V.resolve(self.variants)  # type: ignore[arg-type]
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is not accepted; accepted: auto, cpu, cuda.")
        for name in ("sizes", "batch_sizes"):
            if not getattr(self, name) or any(int(v) < 1 for v in getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)} must be positive integers.")
        if self.iters < 1 or self.warmup < 0 or self.input_sets < 1:  # type: ignore[operator]
            raise ConfigError(f"iters={self.iters}, warmup={self.warmup}, input_sets="
                              f"{self.input_sets}: need iters >= 1, warmup >= 0, input_sets >= 1.")
        # Checked here, not hours into a run: every size must fit the deepest layer.
        smallest = self.spec().min_size
        too_small = [s for s in self.sizes if int(s) < smallest]  # type: ignore[union-attr]
        if too_small:
            raise ConfigError(f"sizes {too_small} are below {smallest} pixels, the smallest side "
                              f"{self.spec().deepest} accepts; give sizes of at least {smallest}.")

    def points(self, workload: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(sizes, batch sizes) measured for ``workload``: those of the config, except
        where it names none and the workload has its own (POINTS); a workload with
        fixed batches (stylize-step: 1) always uses those."""
        sizes_given, batches_given = getattr(self, "_given", (True, True))
        own = POINTS.get(workload, {}).get("quick" if self.quick else "full")
        sizes = self.sizes if sizes_given or own is None else own[0]
        batches = self.batch_sizes if batches_given or own is None else own[1]
        fixed = W.get(workload).batches
        return tuple(sizes), tuple(fixed if fixed is not None else batches)  # type: ignore[arg-type]

    def spec(self) -> FeatureSpec:
        """The network every variant runs (weights are loaded later, once)."""
        return FeatureSpec(arch=self.arch, layers=self.layers, weights=self.weights, seed=self.seed)


@dataclass
class Row:
    """One variant on one (workload, size, batch). ``status``: "ok", "WRONG" (error
    over its tier's tolerance: not ranked, no speedup), "skipped" (cannot run
    here; ``reason`` says why) or "failed" (raised; ``reason`` has the error)."""

    variant: str
    workload: str
    size: int
    batch: int
    status: str
    reason: str = ""
    runs_on: str = ""
    precision: str = ""
    tolerance: float | None = None
    grad_tolerance: float | None = None
    unit: str = "images/s"
    stats: Stats | None = None
    cold_start_s: float | None = None
    max_rel_err: float | None = None  # of the terms/features; grad.x apart
    grad_rel_err: float | None = None  # grad.x, sparse reroutes forgiven (tiers.py)
    speedup: float | None = None
    flops_per_call: int = 0
    tflops: float | None = None
    peak_fraction: float | None = None
    memory: Memory | None = None
    host_io: bool = False  # a GPU row fed numpy arrays: its time includes the PCIe copies

    @property
    def measured(self) -> bool:
        return self.stats is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = self.stats.to_dict() if self.stats else None
        return d


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict[str, Any]
    peaks: dict[str, Peak]  # "cpu-fp32", "cuda-tf32", ...
    exports: list[dict[str, Any]]
    rows: list[Row] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False  # Ctrl-C stopped the run; ``rows`` hold what was measured

    def row(self, variant: str, workload: str, size: int, batch: int) -> Row:
        for r in self.rows:
            if (r.variant, r.workload, r.size, r.batch) == (variant, workload, size, batch):
                return r
        raise KeyError((variant, workload, size, batch))

    @property
    def skipped(self) -> dict[str, str]:
        """{variant: reason} for variants that could not run (on some workload)."""
        out: dict[str, dict[str, list[str]]] = {}
        for r in self.rows:
            if r.status == "skipped":
                out.setdefault(r.variant, {}).setdefault(r.reason, [])
                if r.workload not in out[r.variant][r.reason]:
                    out[r.variant][r.reason].append(r.workload)
        measured = {r.variant for r in self.rows if r.status != "skipped"}
        return {v: "; ".join(reason if v not in measured and len(by) == 1
                             else f"{reason} ({', '.join(ws)})" for reason, ws in by.items())
                for v, by in out.items()}


def run(config: BenchConfig | None = None, *,
        progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every variant of ``config`` on every (workload, size, batch); return the data."""
    from ..weights import load_weights

    config = config or BenchConfig()
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    device, gpu_reason = V.resolve_device(config.device)
    chosen = V.resolve(config.variants)  # type: ignore[arg-type]
    spec = config.spec()
    loaded: dict[str, Any] = {}

    def weights(s: FeatureSpec) -> Any:
        if s.key() not in loaded:
            loaded[s.key()] = load_weights(s)
        return loaded[s.key()]

    tmp = None
    if config.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pe-bench-")
    folder = config.cache_dir or tmp.name  # type: ignore[union-attr]
    os.makedirs(folder, exist_ok=True)
    import onnxruntime as ort

    models = W.ModelCache(folder, weights, say)
    ctx = V.Context(device=device, quick=config.quick, gpu_reason=gpu_reason,
                    ort_providers=tuple(ort.get_available_providers()), model_path=models,
                    weights=weights, cache_dir=folder)
    peaks = ceilings(chosen, device, say) if config.measure_peak else {}
    env = harness.environment(device, config, spec, weights(spec), chosen)
    result = BenchResult(config, env, peaks, models.records)
    device_skips: dict[str, str] = {}
    # The baseline runs first; on the CPU it is the float32 reference itself (TF32
    # does not exist there), so its first output serves as the reference.
    ordered = sorted(chosen, key=lambda v: v.name != BASELINE)
    try:
        for wname in config.workloads:  # type: ignore[union-attr]
            if result.interrupted:
                break
            workload = W.get(wname)
            sizes, batches = config.points(wname)
            for size in sizes:
                for batch in batches:
                    if result.interrupted:
                        break
                    case = W.make_case(workload, spec, int(size), int(batch),
                                       n_sets=config.input_sets, seed=config.seed)
                    say(f"{wname} {size}x{size} batch {batch}")
                    ref: dict[str, Any] = {}  # filled by the first variant that runs
                    rows = []
                    try:
                        for v in ordered:
                            rows.append(_measure(v, ctx, case, ref, config, device_skips, say))
                    except KeyboardInterrupt:
                        # Ctrl-C: keep every row measured so far; the reports are still written.
                        result.interrupted = True
                        say("interrupted: reporting the rows measured so far")
                    _rank(rows)
                    result.rows.extend(rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if config.measure_peak and not result.interrupted:  # the better of two measurements counts
        for key, peak in ceilings(chosen, device, say).items():
            if key not in peaks or peak.tflops > peaks[key].tflops:
                peaks[key] = peak
    for row in result.rows:
        peak = peaks.get(f"{row.runs_on}-{row.precision}")
        if peak and row.tflops is not None:
            row.peak_fraction = row.tflops / peak.tflops
    result.wall_s = time.perf_counter() - start
    result.environment["load_average_at_end"] = harness.load_average()
    return result


def _reference(ctx: V.Context, case: W.Case) -> dict[str, Any]:
    runner = V.TorchRunner(ctx, case, "fp32")
    with V.strict_fp32():
        runner.build()
        out = W.to_numpy(runner.call(0))
    _free(runner)
    return out


def _free(runner: Any) -> None:
    runner.close()
    del runner
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure(v: V.Variant, ctx: V.Context, case: W.Case, ref: dict[str, Any], config: BenchConfig,
             device_skips: dict[str, str], say: Callable[[str], None]) -> Row:
    """Build, cold-start, check and time one variant on one case. An empty ``ref`` is
    filled first: with the reference's outputs, or on the CPU with the baseline's own
    first output (there the baseline is the float32 reference: no TF32 on a CPU)."""
    row = Row(v.name, case.workload.name, case.size, case.batch, "skipped", unit=case.workload.unit,
              flops_per_call=case.workload.flops_per_item(case.spec, case.size) * case.batch,
              host_io=bool(getattr(v, "host_io", False)))
    why = v.unavailable(ctx, case) or device_skips.get(v.name)
    if why:
        row.reason = why
        return row
    runner = None
    is_reference = ctx.device == "cpu" and v.name == BASELINE
    try:
        if not ref and not is_reference:  # inside the try: a reference that fails fails this row
            ref.update(_reference(ctx, case))
        runner = v.runner(ctx, case)  # stages inputs, exports the model: not timed
        row.runs_on, row.precision = runner.runs_on, runner.precision
        row.tolerance = TOLERANCE[runner.precision]
        if case.workload.grad:
            row.grad_tolerance = V.GRAD_TOLERANCE[runner.precision]
        with harness.MemoryProbe(runner.memory_torch_cuda, runner.memory_smi) as probe:
            t0 = time.perf_counter()
            runner.build()
            first = runner.call(0)
            runner.sync()
            row.cold_start_s = time.perf_counter() - t0
            got = W.to_numpy(first)
            del first
            if is_reference and not ref:
                ref.update(got)
            row.max_rel_err = W.max_rel_error(got, ref)
            row.grad_rel_err = W.grad_rel_error(got, ref, V.GRAD_FORGIVE[runner.precision])
            samples = harness.time_calls(runner.call, runner.sync, n_sets=config.input_sets,
                                         warmup=config.warmup, iters=config.iters, start=1)  # type: ignore[arg-type]
            row.memory = probe.read()
    except DeviceError as exc:
        # unavailable() said the provider is here, so it failing to start is a
        # failure (a TensorRT profile refused, a library missing), not a skip. The
        # other cases still try it: a failure may be one graph kind's.
        row.status, row.reason = "failed", f"DeviceError: {str(exc).splitlines()[0][:300]}"
        say(f"  {v.name}: failed: {row.reason}")
        return row
    except Exception as exc:  # noqa: BLE001 - a broken variant is reported, the run goes on
        row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        say(f"  {v.name}: failed: {row.reason}")
        return row
    finally:
        if runner is not None:
            _free(runner)
    row.stats = harness.summarize(samples, case.batch)
    grad_ok = row.grad_rel_err is None or row.grad_rel_err <= row.grad_tolerance  # type: ignore[operator]
    row.status = "ok" if row.max_rel_err <= row.tolerance and grad_ok else "WRONG"  # NaN -> WRONG
    row.tflops = row.flops_per_call / (row.stats.p50 / 1000) / 1e12
    say(f"  {v.name}: p50 {row.stats.p50:.1f} ms, {row.stats.throughput:.2f} {row.unit}, "
        f"max rel err {row.max_rel_err:.2e}"
        + (f", grad.x {row.grad_rel_err:.2e}" if row.grad_rel_err is not None else "")
        + f" ({row.status})")
    return row


def _rank(rows: list[Row]) -> None:
    """Speedup = baseline p50 / variant p50, for rows that passed their check."""
    base = next((r for r in rows if r.variant == BASELINE and r.status == "ok"), None)
    for r in rows:
        r.speedup = base.stats.p50 / r.stats.p50 if base and r.status == "ok" else None  # type: ignore[union-attr]
