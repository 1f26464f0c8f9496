"""A BenchResult as Markdown (for the README), JSON (for machines) and PNG (for people).

Pure formatting: nothing here measures, and nothing prints.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from .._io import atomic_path
from .variants import GRAD_TOLERANCE, TOLERANCE

if TYPE_CHECKING:
    from . import BenchResult, Row

COLUMNS = ("variant", "workload", "size", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput",
           "speedup", "max rel err", "% of peak", "cold start s", "host peak MiB", "GPU MiB",
           "status")


def _ms(v: float | None) -> str:
    if v is None:  # too few samples for this percentile
        return "—"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _ratio(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}×" if v < 1 else f"{v:.1f}×"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _status(r: "Row") -> str:
    if r.status == "WRONG":
        over = [f"> {r.tolerance:g}"] if not (r.max_rel_err or 0.0) <= (r.tolerance or 0.0) else []
        if r.grad_rel_err is not None and not r.grad_rel_err <= (r.grad_tolerance or 0.0):
            over.append(f"grad.x > {r.grad_tolerance:g}")
        return f"**WRONG** ({', '.join(over) or f'> {r.tolerance:g}'})"
    if r.status == "failed":
        return f"failed: {r.reason}"
    return "ok"


def label(r: "Row") -> str:
    """A row's name in the tables: the variant, its precision tier, and "host I/O" when a
    GPU row is fed numpy arrays (its time is mostly PCIe copies, not the GPU's work)."""
    return f"{r.variant} ({r.precision}{', host I/O' if r.host_io else ''})"


def _cells(r: "Row") -> list[str]:
    s = r.stats
    assert s is not None
    mem = r.memory
    pct = None if r.peak_fraction is None else 100 * r.peak_fraction
    unit = "pairs/s" if r.unit == "pairs/s" else "img/s"
    return [
        label(r), r.workload, str(r.size), str(r.batch),
        _ms(s.p50), _ms(s.p90), _ms(s.p99), f"{s.throughput:.3g} {unit}",
        _ratio(r.speedup), _num(r.max_rel_err, ".1e")
        + ("" if r.grad_rel_err is None else f"; grad.x {_num(r.grad_rel_err, '.1e')}"),
        "—" if pct is None else (f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%")
        + (f" ({r.tflops:.3g} TFLOP/s)" if r.tflops is not None else ""),
        _num(r.cold_start_s, ".2f"),
        _num(mem.host_peak_mb if mem else None, ".0f"),
        _num(mem.gpu_mb if mem else None, ".0f") if mem and mem.gpu_source != "n/a" else "n/a",
        _status(r),
    ]


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def to_markdown(result: "BenchResult") -> str:
    """The results table, the skipped variants with reasons, and how it was measured."""
    env, cfg = result.environment, result.config
    v = env["versions"]
    lines = ["## perceptual-engine benchmark", ""]
    if result.interrupted:
        lines += ["**Interrupted (Ctrl-C): the rows below are those measured before the stop.**", ""]
    where = env["device_name"] if env["device"] == "cuda" else f"CPU: {env['cpu_model']}"
    lines += [
        f"- Device: {where} ({env['cpu_cores']} cores; torch threads {env['torch_threads']}); "
        f"{env['platform']}",
        f"- Versions: torch {v['torch']}, torchvision {v['torchvision']}, onnx {v['onnx']}, "
        f"onnxruntime {v['onnxruntime']}, perceptual-engine {v['perceptual-engine']}, "
        f"Python {env['python']}; ORT providers: {', '.join(env['ort_providers'])}",
        f"- Model: {env['spec']['arch']} to {env['spec']['deepest']} (layers "
        f"{', '.join(env['spec']['layers'])}); weights: {env['weights']['source']}"
        + ("; the lpips workload runs VGG16 to relu5_3 (LPIPS taps, inputs in [-1, 1], "
           "same weights source) against the lpips package's LPIPS(net='vgg')"
           if "lpips" in cfg.workloads else "")
        + ("; lpips-alex and lpips-squeeze run AlexNet to relu5 and SqueezeNet 1.1 to fire9 (the lpips "
           "package's taps; random trunks when --weights is another trunk's file) against its "
           "LPIPS(net='alex') and LPIPS(net='squeeze')"
           if {"lpips-alex", "lpips-squeeze"} & set(cfg.workloads) else "")
        + ("; the dists workload runs VGG16 with L2 pooling to relu5_3 (inputs in [0, 1], same "
           "weights source) against DISTS_pytorch's DISTS" if "dists" in cfg.workloads else "")
        + ("; the metrics workload runs LPIPS' VGG16 (inputs in [-1, 1]) against torchmetrics' "
           "LearnedPerceptualImagePatchSimilarity update loop" if "metrics" in cfg.workloads else ""),
        "- TF32: " + ", ".join(f"{k}={val}" for k, val in env["tf32"]["torch"].items())
        + "; ORT use_tf32: " + (", ".join(f"{k}={int(val)}" for k, val in
                                          env["tf32"]["ort use_tf32 by variant"].items()) or "—")
        + "; reference: " + env["tf32"]["reference"],
        f"- Method: {cfg.warmup} warm-up and {cfg.iters} timed calls per point over "
        f"{cfg.input_sets} rotated input sets; median/p90/p99 per call (p90 from 10 samples up, p99 from 100, a dash below); throughput at the "
        "median; cold start = build (session creation / model build) + first call, timed "
        "separately; GPU work timed after torch.cuda.synchronize().",
        "- Memory: host peak MiB = this process's RSS high-water mark while the variant ran "
        + ("(could not be reset here: the peak since the process started)" if any(
            r.memory and r.memory.host_peak_since_start for r in result.rows)
           else "(VmHWM, reset before each variant)") + "; GPU MiB = torch.cuda.max_memory_allocated over the "
        "variant for PyTorch rows, nvidia-smi's per-process figure (delta) for ONNX Runtime rows, "
        "n/a where neither is available.",
        "- Check: each variant's first output vs the float32 PyTorch reference on the same "
        f"inputs, max relative error = max|a−b| / max|b| over all outputs; tolerance {_tiers(TOLERANCE)}; "
        "grad.x apart: the largest 1% of its element errors left out "
        f"(max-pool/ReLU reroutes), tolerance {_tiers(GRAD_TOLERANCE)}; over it = WRONG, not ranked.",
    ]
    if result.peaks:
        lines.append("- Ceiling (measured matrix product): " + "; ".join(
            f"{p.device} {p.precision} {p.tflops:.3g} TFLOP/s ({p.library}, {p.n}², best {p.ms:.1f} ms)"
            for p in result.peaks.values()) + ", the better of a measurement at the start and "
            "at the end of the run. % of peak = achieved conv+Gram TFLOP/s (in brackets) over the "
            "ceiling of the variant's precision; tuned convolution kernels can beat a library's "
            "GEMM, so it can pass 100%.")
    if any(r.host_io for r in result.rows):
        lines.append("- host I/O: a GPU row fed numpy arrays; its time includes copying the inputs "
                     "to the GPU and the outputs back, every call.")
    if env.get("command"):
        lines.append(f"- Command: `{env['command']}`")
    load = (env.get("load_average_at_start"), env.get("load_average_at_end"))
    lines.append(f"- Wall time of the run: {result.wall_s:.1f} s; load average (1/5/15 min) "
                 f"at start {load[0]}, at end {load[1]} (other work on the machine skews timings)")
    lines.append("")
    measured = [r for r in result.rows if r.measured]
    lines += _table(COLUMNS, [_cells(r) for r in measured]) if measured else ["No variant ran."]
    failed = [r for r in result.rows if r.status == "failed"]
    if failed:
        lines += ["", "### Failed", ""]
        lines += _table(("variant", "workload", "size", "batch", "error"),
                        [[r.variant, r.workload, str(r.size), str(r.batch), r.reason] for r in failed])
    if result.skipped:
        lines += ["", "### Skipped", ""]
        lines += _table(("variant", "reason"), [[k, why] for k, why in result.skipped.items()])
    lines.append("")
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(result: "BenchResult") -> dict[str, Any]:
    """Everything: config, environment, ceilings, exports and every row with raw samples."""
    from dataclasses import asdict

    return _clean({
        "format": 1,
        "config": asdict(result.config),
        "environment": result.environment,
        "peaks": {k: p.to_dict() for k, p in result.peaks.items()},
        "exports": result.exports,
        "rows": [r.to_dict() for r in result.rows],
        "skipped": result.skipped,
        "wall_s": result.wall_s,
        "interrupted": result.interrupted,
    })


def to_png(result: "BenchResult", path: str | os.PathLike) -> str | None:
    """Throughput by variant and batch size, one panel per (workload, size).

    Returns the path written, or None when matplotlib is not installed (nothing
    is written then). WRONG results are drawn hatched and labelled.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    measured = [r for r in result.rows if r.measured]
    # One panel per (workload, size): workloads down, sizes across, in run order.
    work = list(dict.fromkeys(r.workload for r in measured))
    sizes = sorted({r.size for r in measured})
    fig = Figure(figsize=(max(6.0, 5.5 * len(sizes)), 4.2 * max(1, len(work))), layout="constrained")
    FigureCanvasAgg(fig)
    if not measured:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no variant ran", ha="center", va="center")
        ax.set_axis_off()
    for row_i, workload in enumerate(work):
        for col_i, size in enumerate(sizes):
            if not any((r.workload, r.size) == (workload, size) for r in measured):
                continue
            ax = fig.add_subplot(len(work), len(sizes), row_i * len(sizes) + col_i + 1)
            _panel(ax, [r for r in measured if (r.workload, r.size) == (workload, size)],
                   workload, size)
    env = result.environment
    fig.suptitle(f"perceptual-engine throughput on {env['device_name']}\n"
                 f"weights {env['weights']['source']}; hatched = WRONG", fontsize=10)
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return os.fspath(path)


def _panel(ax: Any, rows: list["Row"], workload: str, size: int) -> None:
    """Grouped bars: one group per variant, one bar per batch size."""
    names = list(dict.fromkeys(r.variant for r in rows))
    batches = sorted({r.batch for r in rows})
    width = 0.8 / len(batches)
    labelled: set[int] = set()
    for j, b in enumerate(batches):
        for i, name in enumerate(names):
            r = next((r for r in rows if r.variant == name and r.batch == b), None)
            if r is None or r.stats is None:
                continue
            wrong = r.status != "ok"
            x = i + (j - (len(batches) - 1) / 2) * width
            ax.bar(x, r.stats.throughput, width, color=f"C{j}", hatch="//" if wrong else None,
                   alpha=0.5 if wrong else 1.0,
                   label=None if b in labelled else f"batch {b}")
            labelled.add(b)
            if wrong:
                ax.text(x, r.stats.throughput, "WRONG", rotation=90, ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(rows[0].unit)
    ax.set_title(f"{workload}, {size}×{size}", fontsize=10)
    values = [r.stats.throughput for r in rows if r.stats]
    if values and max(values) / max(min(values), 1e-12) > 50:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _tiers(table: dict[str, float]) -> str:
    return ", ".join(f"{tier} {tol:.0e}".replace("e-0", "e-") for tier, tol in table.items())
