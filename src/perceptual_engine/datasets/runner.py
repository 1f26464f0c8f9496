"""Compute the distance of many image pairs: decode on threads, batch by size, stream rows.

Images are decoded (and resized/cropped) on a ThreadPoolExecutor, at most
``prefetch`` pairs ahead, while the calling thread runs the engine on batches of
equally-sized pairs. The time the engine thread waits for decoded images is
measured, so the summary says whether the engine was starved.
"""
from __future__ import annotations

import collections
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Sequence

import numpy as np

from .. import memory as _memory
from ..errors import (ImageError, MemoryBudgetError, NonFiniteError, OutOfMemoryError,
                      PerceptualError)
from ..images import MAX_IMAGE_PIXELS, decode, limit_side, match_sizes
from .pairs import Pair
from .results import Row
from ..spec import INPUT_RANGES


@dataclass
class RunStats:
    total: int = 0  # pairs asked for, skipped ones included
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)
    wall_s: float = 0.0
    engine_s: float = 0.0  # inside Engine.distance
    wait_s: float = 0.0  # engine thread blocked on a decode
    decode_s: float = 0.0  # summed over decode threads
    workers: int = 0
    batches: int = 0
    failures: list[Row] = field(default_factory=list)

    @property
    def idle_fraction(self) -> float:
        """Share of the run's wall time the engine thread spent waiting for images."""
        return self.wait_s / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        done = self.ok + self.failed
        rate = done / self.wall_s if self.wall_s > 0 else 0.0
        parts = [f"{self.total} pair(s): {self.ok} ok, {self.failed} failed"]
        if self.skipped:
            parts[0] += f", {self.skipped} skipped (already in the output)"
        parts.append(f"{self.wall_s:.2f} s, {rate:.1f} pairs/s")
        parts.append(f"engine busy {self.engine_s:.2f} s in {self.batches} batch(es), idle "
                     f"{100 * self.idle_fraction:.0f}% waiting for images (decode "
                     f"{self.decode_s:.2f} s on {self.workers} thread(s))")
        return "; ".join(parts)


@dataclass
class _Decoded:
    pair: Pair
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    error: str = ""
    seconds: float = 0.0


class Progress:
    """A tqdm progress bar (count, rate, ETA) on ``stream``, drawn only when ``enabled``.

    The command line enables it when stderr is a terminal; ``message`` prints a line without
    garbling the bar, drawn or not. tqdm is imported only when a bar is drawn.
    """

    def __init__(self, total: int, stream: IO[str], enabled: bool, unit: str = "pairs") -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done, self.start = 0, time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=stream, unit=f" {unit}", dynamic_ncols=True,
                             mininterval=0.1, leave=False, ascii=".#",
                             bar_format="[{bar:24}] {n_fmt}/{total_fmt}" + f" {unit}" +
                                        " {percentage:3.0f}% {rate_fmt} ETA {remaining}")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if self.done >= self.total:
                self._bar.refresh()  # the last state is drawn even inside tqdm's mininterval

    def message(self, text: str) -> None:
        """Print a line on the stream without garbling the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _decode_pair(pair: Pair, policy: str, scale: tuple[float, float], min_size: int,
                 max_pixels: int | None, max_side: int | None = None) -> _Decoded:
    start = time.perf_counter()
    out = _Decoded(pair)
    try:
        x = limit_side(decode(pair.a, max_pixels=max_pixels), max_side)
        y = limit_side(decode(pair.b, max_pixels=max_pixels), max_side)
        x, y = match_sizes(x, y, policy)
        h, w = x.shape[1:]
        if min(h, w) < min_size:
            raise ImageError(f"{h}x{w} is too small for the model's deepest layer; accepted: "
                             f"height and width >= {min_size}.")
        lo, hi = scale
        if (lo, hi) != (0.0, 1.0):
            x, y = lo + (hi - lo) * x, lo + (hi - lo) * y
        out.x, out.y = x, y
    except ImageError as exc:
        out.error = str(exc)
    out.seconds = time.perf_counter() - start
    return out


NOT_FINITE = ("the distance is not finite: the model's precision overflowed on this pair (a "
              "float32 model does not overflow here)")
NOT_FINITE_INPUT = "the image holds NaN or Inf values"


def make_row(pair: Pair, terms: Sequence[str], values: dict[str, float] | None,
             error: str = "") -> Row:
    """The result row of one pair: both paths, every term (None when not computed), error."""
    row: Row = {"a": pair.a, "b": pair.b}
    row.update({t: (values[t] if values else None) for t in terms})
    row["error"] = error
    return row


def row_terms(output_names: Sequence[str]) -> list[str]:
    """A model's per-pair scalar outputs: the row's columns (maps and gradients are not)."""
    return [n for n in output_names if n not in ("spatial", "grad.x")]


def compute_batch(engine, items: Sequence[_Decoded], *,
                  maps: Callable[[Pair, np.ndarray], None] | None = None,
                  ) -> tuple[list[tuple[Pair, dict[str, float] | None, str]], float, int]:
    """Run decoded pairs of one size through ``engine`` as one batch.

    Returns ([(pair, terms or None, error)] in input order, seconds inside the engine,
    successful engine calls). A non-finite sample fails alone; a batch the engine
    refuses is retried one pair at a time, so the error lands on the pair that caused it.
    ``maps`` receives each computed pair's LPIPS map (H, W) (models with ``spatial``).
    """
    terms = row_terms(engine.output_names)
    x = np.ascontiguousarray(np.stack([i.x for i in items]))
    y = np.ascontiguousarray(np.stack([i.y for i in items]))
    start = time.perf_counter()
    bad: set[int] = set()
    why = NOT_FINITE
    try:
        out = engine.distance(x, y)
    except NonFiniteError as exc:  # the finite samples of the batch stand
        out, bad = exc.out, set(exc.bad)
        why = NOT_FINITE_INPUT if exc.inputs else NOT_FINITE
    except PerceptualError as exc:
        seconds = time.perf_counter() - start
        if len(items) == 1:
            return [(items[0].pair, None, _row_error(exc, items[0].x.shape))], seconds, 0
        results, calls = [], 0
        for item in items:  # find which pair it was: one at a time
            r, s, c = compute_batch(engine, [item], maps=maps)
            results += r
            seconds += s
            calls += c
        return results, seconds, calls
    seconds = time.perf_counter() - start
    results = []
    for k, item in enumerate(items):
        if k in bad:
            results.append((item.pair, None, why))
        else:
            if maps is not None:
                maps(item.pair, np.asarray(out["spatial"][k, 0]))
            # The shortest decimal that is the same float32: no float64 noise digits.
            results.append((item.pair, {t: float(str(np.float32(out[t][k]))) for t in terms}, ""))
    return results, seconds, 1


def run_pairs(engine, pairs: Sequence[Pair], sinks: Iterable[Callable[[Row], None]], *,
              batch_size: int = 8, size_policy: str = "error", workers: int | None = None,
              skip: set[tuple[str, str]] | frozenset = frozenset(),
              max_pixels: int | None = MAX_IMAGE_PIXELS, max_side: int | None = None,
              progress: Progress | None = None,
              maps: Callable[[Pair, np.ndarray], None] | None = None) -> RunStats:
    """Compute every pair not in ``skip`` with ``engine`` (a distance or LPIPS Engine);
    each row goes to every sink as soon as it is known. ``maps`` receives each computed
    pair's LPIPS map (H, W) float32 (an LPIPS model with the ``spatial`` output).
    Returns the run's statistics.

    Images whose longer side exceeds ``max_side`` are downscaled first (aspect kept).
    A batch holds at most ``batch_size`` pairs of one size, fewer when the engine's
    memory estimate for more would exceed its budget; a pair that alone exceeds it,
    or that runs out of memory, becomes an error row and the run goes on."""
    sinks = list(sinks)
    # Per-pair maps and gradients are not row columns.
    terms = row_terms(engine.output_names)
    workers = workers or min(4, os.cpu_count() or 1)
    prefetch = max(2 * batch_size, 2 * workers)
    stats = RunStats(total=len(pairs), workers=workers)
    todo = [p for p in pairs if p.key not in skip]
    stats.skipped = len(pairs) - len(todo)
    bar = progress or Progress(len(todo), sys.stderr, enabled=False)
    scale = INPUT_RANGES[engine.spec.input_range]
    budget = engine.max_pixels

    def emit(pair: Pair, values: dict[str, float] | None, error: str = "") -> None:
        row = make_row(pair, terms, values, error)
        for sink in sinks:
            sink(row)
        if error:
            stats.failed += 1
            stats.failures.append(row)
            bar.message(f"perceptual-engine: failed: {pair.a} | {pair.b}: {error}")
        else:
            stats.ok += 1
        bar.advance()

    def run_batch(items: list[_Decoded]) -> None:
        results, seconds, calls = compute_batch(engine, items, maps=maps)
        stats.engine_s += seconds
        stats.batches += calls
        for pair, values, error in results:
            emit(pair, values, error)

    def batch_limit(shape: tuple[int, ...]) -> int:
        most = batch_size if budget is None else max(1, min(batch_size, budget // (shape[1] * shape[2])))
        return _memory.fit_batch(engine, shape[1], shape[2], most)

    start = time.perf_counter()
    groups: dict[tuple[int, ...], list[_Decoded]] = collections.defaultdict(list)
    held = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        it = iter(todo)
        queue: collections.deque[Future[_Decoded]] = collections.deque()

        def fill() -> None:
            while len(queue) < prefetch:
                pair = next(it, None)
                if pair is None:
                    return
                if pair.error:
                    emit(pair, None, pair.error)
                    continue
                queue.append(pool.submit(_decode_pair, pair, size_policy, scale,
                                         engine.spec.min_size, max_pixels, max_side))

        try:
            fill()
            while queue:
                fut = queue.popleft()
                fill()
                t0 = time.perf_counter()
                item = fut.result()
                stats.wait_s += time.perf_counter() - t0
                stats.decode_s += item.seconds
                if item.error:
                    emit(item.pair, None, item.error)
                    continue
                shape = item.x.shape  # type: ignore[union-attr]
                groups[shape].append(item)
                held += 1
                if len(groups[shape]) >= batch_limit(shape):
                    held -= len(groups[shape])
                    run_batch(groups.pop(shape))
                elif held > prefetch:  # many sizes: do not hold images forever
                    largest = max(groups, key=lambda s: len(groups[s]))
                    held -= len(groups[largest])
                    run_batch(groups.pop(largest))
            for shape in list(groups):
                run_batch(groups.pop(shape))
        finally:
            for fut in queue:
                fut.cancel()
    stats.wall_s = time.perf_counter() - start
    bar.close()
    return stats


def _row_error(exc: PerceptualError, shape: tuple[int, ...]) -> str:
    """The error row's text; memory errors name the command line's own fixes."""
    if isinstance(exc, MemoryBudgetError):
        side = _memory.suggest_side(shape[-2], shape[-1], exc.estimate, exc.budget)
        return (f"needs about {_memory.format_bytes(exc.estimate)}, over the memory budget of "
                f"{_memory.format_bytes(exc.budget)}; downscale with --max-side "
                f"{side or 'N'} (and --size-policy resize for pairs of other sizes), or raise "
                "--memory-budget")
    if isinstance(exc, OutOfMemoryError):
        need = f" (needs about {_memory.format_bytes(exc.estimate)})" if exc.estimate else ""
        return (f"ran out of memory{need}; downscale with --max-side N, or set --memory-budget "
                "below the memory this machine has free so such pairs are refused up front")
    return str(exc)
