"""Dynamic batching: requests of one size run as one engine call.

Ray Serve's ``@serve.batch`` forms the next batch while the previous one is still
running (its loop waits for the batch, not for the engine), so with a short wait it
sends batches of one to an engine that is busy, and with a long wait every lone request
pays the wait. ``Batcher`` takes the next batch when the engine is free: everything that
arrived meanwhile, up to ``max_batch``. A lone request runs at once (``wait_s`` 0), and
under load the batches fill by themselves.

``run_pairs`` is the engine side: pairs grouped by (H, W), each group cut into calls of at
most ``max_batch`` pairs that fit the memory budget (memory.fit_batch), results split back.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..memory import fit_batch


def size_groups(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[tuple[int, int], list[int]]:
    """{(H, W): indices of the pairs of that size}, in arrival order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (x, _) in enumerate(pairs):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    return groups


def run_pairs(engine: Any, pairs: Sequence[tuple[np.ndarray, np.ndarray]], terms: Sequence[str],
              max_batch: int, on_call: Callable[[int], None] | None = None) -> list[Any]:
    """One result per pair: {term: float} or the exception that failed that pair.

    pairs: (x, y) each (3, H, W) float32 in the model's input range, x and y of one size.
    A call that fails (a PerceptualError, or any runtime error) is retried pair by pair,
    so one bad pair fails alone and other sizes in the batch are not touched.
    ``on_call(n)`` is told the size of every engine call.
    """
    out: list[Any] = [None] * len(pairs)
    for (h, w), idx in size_groups(pairs).items():
        most = min(max_batch, len(idx))
        if getattr(engine, "max_pixels", None):  # the engine's N·H·W bound per call
            most = max(1, min(most, engine.max_pixels // (h * w)))
        step = fit_batch(engine, h, w, most)
        for start in range(0, len(idx), step):
            chunk = idx[start:start + step]
            _run_chunk(engine, pairs, terms, chunk, out, on_call)
    return out


def _run_chunk(engine, pairs, terms, chunk, out, on_call) -> None:
    x = np.stack([pairs[i][0] for i in chunk])
    y = np.stack([pairs[i][1] for i in chunk])
    try:
        res = engine.distance(x, y)
    except Exception as exc:  # a refused pair, or a runtime error: the others still run
        if len(chunk) == 1:
            out[chunk[0]] = exc
            return
        for i in chunk:
            _run_chunk(engine, pairs, terms, [i], out, on_call)
        return
    if on_call is not None:
        on_call(len(chunk))
    for j, i in enumerate(chunk):
        out[i] = {t: float(res[t][j]) for t in terms}


class Batcher:
    """Collects submitted items and hands them to ``compute`` (a blocking function of a
    list, run in a worker thread) one batch at a time.

    max_batch: items per batch at most. wait_s: how long a free engine waits for a batch
    to fill before it runs a partial one (0: at once).
    """

    def __init__(self, compute: Callable[[list], list], max_batch: int, wait_s: float = 0.0) -> None:
        self.compute, self.max_batch, self.wait_s = compute, max_batch, wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The item's result (or the exception ``compute`` returned for it)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        self._queue.put_nowait((item, future))
        return await future

    async def _loop(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # clients gone
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.compute, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - a bug in compute fails its batch, not the loop
                results = [exc] * len(batch)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)


class PixelBudget:
    """At most ``cap`` pixels of decoded images held at once: ``async with budget.hold(n)``
    waits until n more fit (one pair over ``cap`` alone is the caller's to refuse)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.held = cap, 0
        self._room: asyncio.Condition | None = None  # made on the replica's running loop

    @contextlib.asynccontextmanager
    async def hold(self, n: int):
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            await self._room.wait_for(lambda: self.held + n <= self.cap)
            self.held += n
        try:
            yield
        finally:
            async with self._room:
                self.held -= n
                self._room.notify_all()
