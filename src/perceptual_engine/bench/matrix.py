"""The ``matrix`` workload: an all-pairs LPIPS matrix of N images, three ways, one run.

- ``engine.matrix``: Engine.matrix(x), N forward passes and one GEMM per tap;
- ``engine pairwise``: Engine.distance on every pair i < j, 8 pairs per call;
- ``lpips row loop``: the lpips package's documented pattern, one call per row,
  ``model(imgs, imgs[i:i+1])`` (the row image broadcast), all N images re-run per row.

All on the same seeded images in [-1, 1] and the same seeded VGG16 weights (the
lpips package gets them copied in, bench/lpips_baseline.py). The two baselines are
slow; ``--baseline-pairs`` times only that many pairs of each (whole rows for lpips)
and extrapolates linearly to the full matrix, which the row says. Every timed value
is also checked against the matrix (max absolute difference, in the JSON).

    python -m perceptual_engine.bench.matrix --n 48 --size 64 --out bench-out/matrix

Peak RSS is the process's (``ru_maxrss``): run ``--baselines none`` for the
matrix's own peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, n, size])
    return (2.0 * rng.random((n, 3, size, size), dtype=np.float32) - 1.0).astype(np.float32)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run(n: int, size: int, *, seed: int = 0, baselines: tuple[str, ...] = ("pairwise", "lpips"),
        baseline_pairs: int | None = None, threads: int | None = None, cache_dir: str | None = None,
        memory_budget=None, once: bool = False, say=lambda m: None) -> dict:
    from ..datasets.cache import ensure_model, models_dir
    from ..lpips import default_spec
    from ..runtime import Engine

    spec = default_spec("random", seed=seed, input_range="-1,1")
    entry = ensure_model(spec, None, graph="lpips", folder=models_dir(cache_dir), say=say)
    x = _images(n, size, seed)
    result: dict = {"workload": "matrix", "n": n, "size": size, "seed": seed, "once": once,
                    "model": "LPIPS VGG16, seeded random trunk, lpips v0.1 linear weights",
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)",
                    "load_before": os.getloadavg()[0], "rows": {}}
    t0 = time.perf_counter()
    engine = Engine(entry.path, "cpu", threads=threads, memory_budget=memory_budget)
    load = time.perf_counter() - t0
    stats: dict = {}
    t1 = time.perf_counter()
    mat = engine.matrix(x, stats=stats)["total"]
    first = warm = time.perf_counter() - t1
    if not once:
        t1 = time.perf_counter()
        mat = engine.matrix(x)["total"]
        warm = time.perf_counter() - t1
    pairs = n * (n - 1) // 2
    result["rows"]["engine.matrix"] = {
        "seconds": warm, "first_call_s": first, "engine_load_s": load,
        "pairs_per_s": pairs / warm, "recomputed_entries": stats.get("recomputed", 0),
        "peak_rss_bytes": _peak_rss(), "measured_pairs": pairs}
    say(f"engine.matrix: {warm:.2f} s warm ({first:.2f} s first call) for {pairs} pairs")
    iu, ju = np.triu_indices(n, 1)
    if "pairwise" in baselines:
        k = pairs if baseline_pairs is None else min(pairs, baseline_pairs)
        got = np.empty(k, np.float32)
        engine.distance(x[:2], x[1:3])  # warm-up
        t1 = time.perf_counter()
        for s in range(0, k, 8):
            i, j = iu[s:min(s + 8, k)], ju[s:min(s + 8, k)]
            got[s:s + len(i)] = engine.distance(np.ascontiguousarray(x[i]), np.ascontiguousarray(x[j]))["total"]
        t = time.perf_counter() - t1
        result["rows"]["engine pairwise"] = {
            "seconds": t * pairs / k, "measured_pairs": k, "measured_s": t, "pairs_per_s": k / t,
            "max_abs_diff_vs_matrix": float(np.abs(got - mat[iu[:k], ju[:k]]).max())}
        say(f"engine pairwise: {k} pairs in {t:.2f} s")
    if "lpips" in baselines:
        import torch

        from ..weights import load_weights
        from .lpips_baseline import LpipsPackage

        if threads:
            torch.set_num_threads(threads)
        model = LpipsPackage(load_weights(spec))
        rows = n if baseline_pairs is None else max(1, min(n, -(-baseline_pairs // n)))
        imgs = torch.from_numpy(x)
        diff = 0.0
        with torch.no_grad():
            model.model(imgs[:1], imgs[:1])  # warm-up
            t1 = time.perf_counter()
            for i in range(rows):  # the documented loop: each row is N pairs
                d = model.model(imgs, imgs[i:i + 1]).flatten().numpy()  # img_i broadcast
                diff = max(diff, float(np.abs(np.delete(d, i) - np.delete(mat[i], i)).max()))
            t = time.perf_counter() - t1
        result["rows"]["lpips row loop"] = {
            "seconds": t * n / rows, "measured_rows": rows, "measured_s": t,
            "pairs_per_s": rows * n / t, "max_abs_diff_vs_matrix": diff}
        say(f"lpips row loop: {rows} row(s) of {n} in {t:.2f} s")
    base = result["rows"]["engine.matrix"]["seconds"]
    for name, row in result["rows"].items():
        row["speedup_of_matrix"] = row["seconds"] / base
    result["load_after"] = os.getloadavg()[0]
    return result


def markdown(result: dict) -> str:
    lines = [f"N = {result['n']} images of {result['size']}², {result['model']}; load "
             f"{result['load_before']:.1f} → {result['load_after']:.1f} ({result['machine']})", "",
             "| method | time for the N×N matrix | measured | matrix is faster by | max abs diff |",
             "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        if "measured_rows" in row:
            measured = f"{row['measured_rows']} row(s) in {row['measured_s']:.1f} s"
        elif name == "engine.matrix":
            measured = f"all, warm (first call {row['first_call_s']:.1f} s)" if not result["once"] \
                else "all, one call (the first)"
        else:
            measured = f"{row['measured_pairs']} pairs in {row['measured_s']:.1f} s"
        diff = row.get("max_abs_diff_vs_matrix")
        lines.append(f"| {name} | {row['seconds']:.2f} s | {measured} | "
                     f"{row['speedup_of_matrix']:.1f}× | {'—' if diff is None else f'{diff:.1e}'} |")
    peak = result["rows"]["engine.matrix"]["peak_rss_bytes"]
    lines.append("")
    lines.append(f"Peak RSS of the process: {peak / 2**20:.0f} MiB.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perceptual_engine.bench.matrix",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="images (default: 48)")
    p.add_argument("--size", type=int, default=64, help="square side (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines", default="pairwise,lpips",
                   help="comma list of pairwise, lpips; or none (default: both)")
    p.add_argument("--baseline-pairs", type=int, default=None,
                   help="time only about this many pairs of each baseline, extrapolated (default: all)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads")
    p.add_argument("--memory-budget", default=None, help="the engine's memory budget (default: 80%%)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--once", action="store_true", help="time the first call only (no warm call)")
    p.add_argument("--out", default=None, metavar="DIR", help="write matrix.json and matrix.md here")
    args = p.parse_args(argv)
    base = () if args.baselines == "none" else tuple(b for b in args.baselines.split(",") if b)
    result = run(args.n, args.size, seed=args.seed, baselines=base, baseline_pairs=args.baseline_pairs,
                 threads=args.threads, cache_dir=args.cache_dir, memory_budget=args.memory_budget,
                 once=args.once, say=lambda m: print(m, file=sys.stderr, flush=True))
    result["command"] = "python -m perceptual_engine.bench.matrix " + " ".join(argv or sys.argv[1:])
    text = markdown(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = f"matrix-n{args.n}-s{args.size}"
        with open(os.path.join(args.out, stem + ".json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(args.out, stem + ".md"), "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
