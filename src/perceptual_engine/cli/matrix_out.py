"""What ``matrix``, ``nearest`` and ``dedup`` do with the embeddings: the matrix file, the
neighbour rows, the duplicate groups (cli/matrix.py parses and embeds)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from .._io import atomic_path
from ..errors import ConfigError


def _device(engine: Any) -> str:
    from ..runtime.matrix import gemm_device

    return gemm_device(engine)


def write_matrix(args, engine, emb, sets, stores, p, fmt, say: Callable[[str], None]) -> None:
    from ..runtime.matrix import assemble

    ex, ey = stores[0], (stores[1] if len(stores) > 1 else None)
    rows = sets[0].names
    cols = sets[1].names if ey is not None else rows
    bar = _Bar(len(rows) * len(cols), "entries")
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        mats = assemble(ex, ey, emb.weights, p.block, device=_device(engine), stats=stats,
                        progress=bar.bar.advance)
    finally:
        bar.bar.close()
    say(f"{len(rows)}x{len(cols)} matrix in {time.perf_counter() - t0:.1f} s after the embeddings "
        f"({stats.get('recomputed', 0)} near entries recomputed from the difference)")
    errors = {**{sets[0].names[i]: why for i, why in ex.errors.items()},
              **({sets[1].names[i]: why for i, why in ey.errors.items()} if ey is not None else {})}
    stat = summary(mats["total"], ey is None)
    if args.output:
        from ..datasets.results import model_identity, sidecar_path

        record = {"format": 1, "rows": rows, "columns": cols, "term": args.term,
                  "terms": list(mats), "errors": errors, "summary": stat,
                  "model": model_identity(engine.info),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # The sidecar (the rows' and columns' names) is written first, beside its place, and
        # renamed only after the matrix is: a failure leaves the old pair, never a matrix
        # without its names.
        with atomic_path(sidecar_path(args.output)) as side:
            with open(side, "wb") as fh:
                fh.write(json.dumps(record, indent=1).encode())
            _write(args.output, fmt, mats, args.term, rows, cols, ex, ey)
        say(f"wrote {args.output} ({fmt}; rows and columns as listed in "
            f"{os.path.basename(sidecar_path(args.output))})")
    if args.summary:
        if stat["pairs"] == 0:
            print("pairs 0 (one image: a 1x1 matrix, no pairwise distance)")
        else:
            print("  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in stat.items()))


def _write(path: str, fmt: str, mats: dict, term: str, rows, cols, ex, ey) -> None:
    """The file, written beside ``path`` and renamed over it: never half written."""
    if fmt == "npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, mats[term])
    elif fmt == "csv":
        import csv

        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["", *cols])
            for name, values in zip(rows, mats[term]):
                w.writerow([name, *("" if not np.isfinite(v) else format(float(v), ".9g")
                                    for v in values)])
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("-o .parquet needs pyarrow (pip install pyarrow, or "
                              "perceptual-engine[ray]); or write .npy or .csv.") from None
        n, m = len(rows), len(cols)
        other = ex if ey is None else ey
        why = np.array([""] * n, dtype=object)
        for i, e in ex.errors.items():
            why[i] = f"a: {e}"
        why_b = np.array([""] * m, dtype=object)
        for j, e in other.errors.items():
            why_b[j] = f"b: {e}"
        err = [a if a else b for a, b in zip(np.repeat(why, m), np.tile(why_b, n))]
        data = {"a": pa.array(np.repeat(np.array(rows, dtype=object), m)),
                "b": pa.array(np.tile(np.array(cols, dtype=object), n))}
        for t, v in mats.items():
            flat = v.ravel()
            data[t] = pa.array(flat, mask=~np.isfinite(flat))
        data["error"] = pa.array(err)
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(data), tmp)


def nearest(args, engine, emb, sets, stores, p) -> None:
    from ..runtime.matrix import blocks

    ex = stores[0]
    eg = stores[1] if len(stores) > 1 else stores[0]
    queries, gallery = sets[0], sets[-1]
    k = min(args.k, eg.n)
    where = {os.path.realpath(path): j for j, path in enumerate(gallery.paths)}
    own = np.array([where.get(os.path.realpath(path), -1) for path in queries.paths])
    best_d = np.full((ex.n, k), np.inf)
    best_j = np.full((ex.n, k), -1, dtype=np.int64)
    for r, c, d in blocks(ex, eg, emb.weights, p.block, device=_device(engine)):
        total = np.where(np.isfinite(d["total"]), d["total"], np.inf)
        cols = np.arange(c.start, c.stop)
        total[own[r][:, None] == cols[None, :]] = np.inf  # never a query's own file
        cand_d = np.concatenate([best_d[r], total], axis=1)
        cand_j = np.concatenate([best_j[r], np.broadcast_to(cols, total.shape)], axis=1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        best_d[r] = np.take_along_axis(cand_d, order, 1)
        best_j[r] = np.take_along_axis(cand_j, order, 1)
    out = []
    for i, name in enumerate(queries.names):
        if i in ex.errors:
            out.append([name, None, None, None, ex.errors[i]])
            continue
        for rank, (dist, j) in enumerate(zip(best_d[i], best_j[i]), start=1):
            if j >= 0 and np.isfinite(dist) and (args.threshold is None or dist <= args.threshold):
                out.append([name, rank, gallery.names[j], float(dist), ""])
    print_rows(["query", "rank", "match", "distance", "error"], out, args.format)


def dedup(args, engine, emb, sets, stores, p, say: Callable[[str], None]) -> None:
    from ..runtime.matrix import blocks

    ex, names = stores[0], sets[0].names
    parent = list(range(ex.n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    closest = np.full(ex.n, np.inf)
    partner = np.full(ex.n, -1, dtype=np.int64)
    for r, c, d in blocks(ex, None, emb.weights, p.block, device=_device(engine)):
        total = d["total"]
        ii, jj = np.nonzero(total <= args.threshold)  # NaN compares false
        for i, j in zip(ii + r.start, jj + c.start):
            if i >= j:
                continue
            dist = float(total[i - r.start, j - c.start])
            parent[find(i)] = find(j)
            for a, b in ((i, j), (j, i)):
                if dist < closest[a]:
                    closest[a], partner[a] = dist, b
    groups: dict[int, list[int]] = {}
    for i in range(ex.n):
        groups.setdefault(find(i), []).append(i)
    rows, g = [], 0
    for members in sorted((m for m in groups.values() if len(m) > 1), key=lambda m: m[0]):
        g += 1
        rows += [[g, names[i], names[partner[i]], float(closest[i])] for i in members]
    print_rows(["group", "image", "closest", "distance"], rows, args.format)
    extra = sum(len(m) - 1 for m in groups.values() if len(m) > 1)
    say(f"{g} group(s) of near-duplicates at --threshold {args.threshold:g}; {extra} image(s) "
        "beyond one per group")


class _Bar:
    """Progress on stderr, drawn only on a terminal."""

    def __init__(self, total: int, unit: str) -> None:
        from ..datasets.runner import Progress

        self.bar = Progress(total, sys.stderr, enabled=sys.stderr.isatty())
        self.unit = unit
        self.bar._draw = self._draw  # the same bar, counting images or entries

    def _draw(self, now: float) -> None:
        b = self.bar
        frac = b.done / b.total if b.total else 1.0
        b.stream.write(f"\r[{'#' * int(24 * frac):.<24}] {b.done}/{b.total} {self.unit} "
                       f"{100 * frac:3.0f}% ")
        b.stream.flush()


def summary(total: np.ndarray, symmetric: bool) -> dict[str, Any]:
    """mean, median, min, max of the pairwise totals (i < j for a symmetric matrix), NaN skipped."""
    vals = total[np.triu_indices(total.shape[0], 1)] if symmetric else total.ravel()
    vals = vals[np.isfinite(vals)].astype(np.float64)
    if vals.size == 0:
        return {"pairs": 0}
    return {"pairs": int(vals.size), "mean": float(vals.mean()), "median": float(np.median(vals)),
            "min": float(vals.min()), "max": float(vals.max())}


def print_rows(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    import csv

    out = sys.stdout
    if fmt == "json":
        json.dump([dict(zip(columns, r)) for r in rows], out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if v is None else v for v in r] for r in rows])
    else:
        cells = [[("-" if v is None else format(v, ".6g") if isinstance(v, float) else str(v))
                  for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
    out.flush()
