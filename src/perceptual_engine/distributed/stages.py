"""The two stages of a Ray Data distance job: decode (CPU tasks) and distance (one Engine per actor).

Both reuse the single-machine command's code, so a row is the same whichever path made
it: ``_decode_pair`` (decode, size policy, minimum size, input range) and
``compute_batch`` (batching, non-finite samples, per-pair errors) from ``cli/runner.py``.

Between the stages a batch is a dict of numpy arrays: ``a``, ``b``, ``error`` (the
pair's error so far, "" if none), ``x`` and ``y`` (one (3, H, W) float32 array per
pair, sizes may differ; (3, 0, 0) when the pair failed) and ``decode_s``.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Sequence

import numpy as np

from .._io import atomic_path, file_lock, sha256_file
from ..datasets.pairs import Pair
from ..datasets.runner import _Decoded, _decode_pair, compute_batch, row_terms
from ..datasets.spatial import map_png

# Columns of the job's rows beside a, b, the terms and error; dropped before rows leave.
STATS_COLUMNS = ("_engine_s", "_actor_s", "_decode_s", "_calls", "_provider", "_spatial")
_EMPTY = np.zeros((3, 0, 0), np.float32)


def decode_batch(batch: dict[str, np.ndarray], *, size_policy: str, scale: tuple[float, float],
                 min_size: int, max_pixels: int | None, max_side: int | None = None) -> dict[str, Any]:
    """Decode a batch of pairs (columns ``a``, ``b``, ``error``) with the CLI's rules.

    A pair whose files cannot be read, differ in size under ``size_policy="error"``
    or are too small keeps its reason in ``error``; it never fails the task.
    """
    xs, ys, errors, seconds = [], [], [], []
    for a, b, err in zip(batch["a"], batch["b"], batch["error"]):
        if err:  # e.g. a file present in one folder only
            xs.append(_EMPTY), ys.append(_EMPTY), errors.append(str(err)), seconds.append(0.0)
            continue
        d = _decode_pair(Pair(str(a), str(b)), size_policy, scale, min_size, max_pixels, max_side)
        ok = not d.error
        xs.append(d.x if ok else _EMPTY)
        ys.append(d.y if ok else _EMPTY)
        errors.append(d.error)
        seconds.append(d.seconds)
    return {"a": batch["a"], "b": batch["b"], "error": np.array(errors, dtype=object),
            "x": xs, "y": ys, "decode_s": np.array(seconds, dtype=np.float64)}


def local_model_copy(data: bytes, sha256: str, folder: str | None = None) -> str:
    """Write model bytes from the object store to a node-local file named by their hash.

    Actors on one node share the file: it is written atomically under a lock, and
    reused when its hash matches. Returns the path.
    """
    import tempfile

    folder = folder or os.path.join(tempfile.gettempdir(), "perceptual-engine-ray")
    path = os.path.join(folder, f"{sha256[:32]}.onnx")
    os.makedirs(folder, exist_ok=True)
    with file_lock(path + ".lock"):
        if not (os.path.isfile(path) and sha256_file(path) == sha256):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(data)
    return path


class DistanceActor:
    """One Engine per actor, opened once in ``__init__``; one Ray batch per call.

    model: a path every node sees, or ``(ObjectRef or bytes, sha256)`` of the file in
        Ray's object store (copied once to a node-local file).
    device: the Engine's device; "auto" takes the GPU Ray assigned to this actor;
        "openvino" runs OpenVINO on the actor's CPUs (precision: the Engine's).
    maps: also return each computed pair's LPIPS map as PNG bytes (column ``_spatial``),
        encoded here so that only a few kilobytes per pair travel to the driver.
    """

    def __init__(self, model: Any, *, device: str = "auto", precision: str = "auto", batch_size: int = 8,
                 threads: int | None = None, memory_budget: Any = None,
                 maps: bool = False) -> None:
        from ..runtime import Engine

        if not isinstance(model, str):
            ref, sha = model
            if not isinstance(ref, bytes):
                import ray

                ref = ray.get(ref)
            model = local_model_copy(ref, sha)
        self.engine = Engine(model, device, threads=threads, memory_budget=memory_budget,
                             precision=precision)
        self.terms = row_terms(self.engine.output_names)
        self.batch_size = batch_size
        self.provider = self.engine.providers[0]
        self.maps = maps

    def _limit(self, shape: Sequence[int]) -> int:
        """The single-process runner's batch limit: pixel budget, then memory estimate."""
        from .. import memory as _memory

        budget = self.engine.max_pixels  # the CLI's per-call pixel budget
        most = self.batch_size if budget is None else \
            max(1, min(self.batch_size, budget // (shape[1] * shape[2])))
        return _memory.fit_batch(self.engine, shape[1], shape[2], most)

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        start = time.perf_counter()
        n = len(batch["a"])
        values: list[dict[str, float] | None] = [None] * n
        errors = [str(e) for e in batch["error"]]
        engine_s = np.zeros(n)
        calls = np.zeros(n, dtype=np.int64)
        pngs: list[bytes | None] = [None] * n
        groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        for k in range(n):
            if not errors[k]:
                groups[tuple(np.shape(batch["x"][k]))].append(k)
        for shape, idx in groups.items():
            step = self._limit(shape)
            for i in range(0, len(idx), step):
                chunk = idx[i:i + step]
                items = [_Decoded(Pair(str(batch["a"][k]), str(batch["b"][k])),
                                  np.asarray(batch["x"][k], np.float32),
                                  np.asarray(batch["y"][k], np.float32)) for k in chunk]
                found: dict[tuple[str, str], bytes] = {}
                collect = (lambda pair, m: found.__setitem__((pair.a, pair.b), map_png(m))) \
                    if self.maps else None
                results, seconds, ncalls = compute_batch(self.engine, items, maps=collect)
                engine_s[chunk] = seconds / len(chunk)
                calls[chunk[0]] = ncalls
                for k, (pair, vals, err) in zip(chunk, results):
                    values[k], errors[k] = vals, err
                    pngs[k] = found.get((pair.a, pair.b))
        cols: dict[str, Any] = {"a": pa.array([str(a) for a in batch["a"]], pa.string()),
                                "b": pa.array([str(b) for b in batch["b"]], pa.string())}
        for t in self.terms:
            cols[t] = pa.array([v[t] if v else None for v in values], pa.float64())
        cols["error"] = pa.array(errors, pa.string())
        cols["_engine_s"] = pa.array(engine_s)
        cols["_decode_s"] = pa.array(np.asarray(batch["decode_s"], np.float64))
        # The whole call, engine included: the rest is this stage's own per-batch cost.
        cols["_actor_s"] = pa.array(np.full(n, (time.perf_counter() - start) / max(n, 1)))
        cols["_calls"] = pa.array(calls)
        cols["_provider"] = pa.array([self.provider] * n, pa.string())
        cols["_spatial"] = pa.array(pngs, pa.binary())
        return pa.table(cols)
