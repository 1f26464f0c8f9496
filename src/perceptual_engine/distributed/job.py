"""Build and run a Ray Data distance job: pairs -> decode tasks -> Engine actors -> rows.

The parts: ray_setup.py (importing and starting Ray), job_plan.py (the model, the
resources, how actors reach the model). Their names are re-exported here, the path
callers use (``job.start_ray``, ``job.resolve_model``)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..datasets.pairs import Pair, pair_key, pairs_from_args
from ..datasets.results import Row
from ..datasets.runner import Progress, RunStats, row_terms
from ..errors import ConfigError, ModelError
from ..images import MAX_IMAGE_PIXELS, SIZE_POLICIES
from ..spec import INPUT_RANGES, FeatureSpec, LossConfig
from .job_plan import Resources, _model_handle, plan_resources, resolve_model
from .ray_setup import INSTALL, _quiet_data_context, import_ray, start_ray
from .stages import DistanceActor, decode_batch

__all__ = [
    "Job", "build_job", "distances", "RayStats", "write_distances",
    # ray_setup.py
    "INSTALL", "import_ray", "start_ray",
    # job_plan.py
    "resolve_model", "Resources", "plan_resources",
]


def _prepare(batch: dict, skip: frozenset) -> dict:
    """A user's Dataset of (a, b) -> the job's input columns, minus the pairs to skip."""
    import numpy as np

    keep = [k for k, (a, b) in enumerate(zip(batch["a"], batch["b"]))
            if pair_key(str(a), str(b)) not in skip]
    err = batch.get("error")
    return {"a": np.asarray(batch["a"])[keep], "b": np.asarray(batch["b"])[keep],
            "error": np.array(["" if err is None else str(err[k] or "") for k in keep], dtype=object)}


@dataclass
class Job:
    dataset: Any  # ray.data.Dataset with the row columns and STATS_COLUMNS
    terms: list[str]
    total: int | None  # pairs given (None for a Dataset input)
    skipped: int
    resources: Resources


def build_job(a: str | None = None, b: str | None = None, *, pairs: str | Sequence[Pair] | None = None,
              dataset: Any = None, model: str | None = None, spec: FeatureSpec | None = None,
              loss: LossConfig | None = None, dtype: str = "float32", size_policy: str = "error",
              batch_size: int = 8, actors: int | None = None, num_gpus: int | None = None,
              device: str = "auto", precision: str = "auto", max_pixels: int | None = MAX_IMAGE_PIXELS,
              max_side: int | None = None, memory_budget: Any = None, cache_dir: str | None = None, share: str = "auto",
              skip: set[tuple[str, str]] | frozenset = frozenset(),
              say: Callable[[str], None] | None = None, maps: bool = False) -> Job:
    """The lazy Dataset of a distance job (Ray must be initialized). ``maps``: rows also
    carry ``_spatial``, each pair's LPIPS map as PNG bytes (a model with ``spatial``)."""
    import ray
    from ..runtime import read_info

    if size_policy not in SIZE_POLICIES:
        raise ConfigError(f"size_policy {size_policy!r}; accepted: {', '.join(SIZE_POLICIES)}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; accepted: an integer >= 1.")
    path = resolve_model(model, spec, loss, dtype=dtype, cache_dir=cache_dir, say=say)
    info = read_info(path)
    if maps and not info.spatial:
        raise ModelError(f"{path!r} has no spatial output; maps need an LPIPS model exported "
                         "with spatial=True (--spatial).")
    res = plan_resources(ray.cluster_resources(), actors=actors, num_gpus=num_gpus, device=device)
    skip = frozenset(skip)
    total = None
    if dataset is not None:
        if a is not None or b is not None or pairs is not None:
            raise ConfigError("give pairs as a and b, pairs=, or dataset=; not several.")
        missing = {"a", "b"} - set(dataset.columns())
        if missing:
            raise ConfigError(f"dataset has columns {dataset.columns()}; accepted: a Dataset with "
                              "string columns 'a' and 'b' (image paths every node can read).")
        source = dataset.map_batches(_prepare, batch_format="numpy", fn_kwargs={"skip": skip},
                                     compute=ray.data.TaskPoolStrategy(),
                                     num_cpus=res.decode_cpus)  # fused with decoding
        skipped = len(skip)
    else:
        if isinstance(pairs, (list, tuple)):
            if a is not None or b is not None:
                raise ConfigError("give pairs as a and b, pairs=, or dataset=; not several.")
            plist = list(pairs)
        else:
            plist = pairs_from_args(a, b, pairs)
        total = len(plist)
        todo = [p for p in plist if p.key not in skip]
        skipped = total - len(todo)
        items = [{"a": p.a, "b": p.b, "error": p.error} for p in todo]
        # Blocks of a few batches: enough blocks for every decode task to have work.
        blocks = max(1, min(math.ceil(len(items) / batch_size), 4096))
        source = ray.data.from_items(items, override_num_blocks=blocks) if items else None
    if source is None:
        return Job(None, row_terms(info.output_names), total, skipped, res)
    lo_hi = INPUT_RANGES[info.spec.input_range]
    decoded = source.map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy",
        fn_kwargs={"size_policy": size_policy, "scale": lo_hi, "min_size": info.spec.min_size,
                   "max_pixels": max_pixels, "max_side": max_side},
        compute=ray.data.TaskPoolStrategy(), num_cpus=res.decode_cpus)
    rows = decoded.map_batches(
        DistanceActor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": _model_handle(path, share), "device": device,
                               "precision": precision,
                               "batch_size": batch_size, "threads": res.threads,
                               "memory_budget": memory_budget, "maps": maps},
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.actor_cpus, num_gpus=res.actor_gpus)
    # Retries are Ray Data's defaults, which a dead worker needs: an actor pool's actors
    # restart without limit and their batches are retried (max_restarts=-1,
    # max_task_retries=-1), a decode task is retried 3 times (Ray's max_retries). Setting
    # them here would go through ray_remote_args, deprecated in Ray 2.60 (tests kill an
    # actor to check the behavior).
    return Job(rows, row_terms(info.output_names), total, skipped, res)


def distances(a: str | None = None, b: str | None = None, *, address: str | None = None,
              **options: Any):
    """Distances of many pairs as a lazy ``ray.data.Dataset`` of rows.

    Pairs: two folders (matched by relative path) or two files as ``a``, ``b``; a pairs
    CSV as ``pairs=``; a list of ``Pair``; or ``dataset=``, a Ray Dataset with string
    columns ``a`` and ``b`` (paths every node can read). Model: ``model=`` (an exported
    distance model) or ``spec=`` (and ``loss=``, ``dtype=``), exported once on the driver.
    Rows: ``a``, ``b``, one float64 column per term (``content.<l>``, ``style.<l>``,
    ``total``; null when the pair failed) and ``error`` ("" when computed). Other
    options: ``size_policy``, ``batch_size``, ``actors``, ``num_gpus``, ``device``,
    ``max_pixels``, ``cache_dir``, ``share`` ("auto", "path" or "object-store"),
    ``skip`` (pair keys to leave out). Starts a local Ray unless one is running.
    """
    start_ray(address)
    _quiet_data_context()
    job = build_job(a, b, **options)
    if job.dataset is None:
        import ray

        return ray.data.from_items([])
    return job.dataset.select_columns(["a", "b", *job.terms, "error"])


@dataclass
class RayStats(RunStats):
    """RunStats of a Ray job: the single-machine summary, with Ray's startup and actors."""

    actors: int = 0
    actor_s: float = 0.0  # inside the actors' calls, engine included
    provider: str = ""
    startup_s: float = 0.0  # Ray start, model resolution, until the first row

    def summary(self) -> str:
        head = super().summary().split("; engine busy")[0]
        return (f"{head}; engine busy {self.engine_s:.2f} s in {self.batches} batch(es) on "
                f"{self.actors} actor(s) ({self.provider or 'no actor ran'}; "
                f"{self.actor_s:.2f} s in actor calls), decode "
                f"{self.decode_s:.2f} s in CPU tasks, {self.startup_s:.2f} s to the first row")


def write_distances(a: str | None = None, b: str | None = None, *, output: str | None = None,
                    resume: bool = False, address: str | None = None,
                    sinks: Sequence[Callable[[Row], None]] = (),
                    progress: Progress | None = None, say: Callable[[str], None] | None = None,
                    maps: Callable[[Pair, bytes], Any] | None = None, **options: Any) -> RayStats:
    """Run the job of ``distances`` and write its rows to ``output`` (.parquet, .csv or
    .jsonl) and to each of ``sinks`` as they arrive; ``resume`` keeps the pairs already
    computed in ``output``. ``maps(pair, png)`` receives each computed pair's LPIPS map
    as PNG bytes (``MapWriter.write_png``; an LPIPS model exported with ``spatial``).
    Returns the run's statistics (``summary()`` is one line)."""
    from .output import open_result_file
    from ..datasets.results import model_identity
    from ..runtime import read_info

    start = time.perf_counter()
    started = start_ray(address)
    try:
        _quiet_data_context()
        say = say or (lambda m: None)
        path = resolve_model(options.pop("model", None), options.pop("spec", None),
                             options.pop("loss", None), dtype=options.get("dtype", "float32"),
                             cache_dir=options.get("cache_dir"), say=say)
        info = read_info(path)
        terms = row_terms(info.output_names)
        writer = open_result_file(output, terms, resume=resume,
                                  identity=model_identity(info)) if output else None
        try:
            job = build_job(a, b, model=path, skip=writer.done if writer else frozenset(), say=say,
                            maps=maps is not None, **options)
            return _drain(job, [*([writer.write] if writer else []), *sinks], progress, start,
                          maps)
        finally:
            if writer is not None:
                writer.close()
    finally:
        if started:
            import ray

            ray.shutdown()


def _drain(job: Job, sinks: Sequence[Callable[[Row], None]], progress: Progress | None,
           start: float, maps: Callable[[Pair, bytes], Any] | None = None) -> RayStats:
    stats = RayStats(total=job.total or 0, skipped=job.skipped, actors=job.resources.actors)
    first: float | None = None
    if job.dataset is not None:
        for table in job.dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None:
                first = time.perf_counter()
            for row in table.to_pylist():
                stats.engine_s += row.pop("_engine_s")
                stats.actor_s += row.pop("_actor_s")
                stats.decode_s += row.pop("_decode_s")
                stats.batches += row.pop("_calls")
                stats.provider = row.pop("_provider") or stats.provider
                png = row.pop("_spatial", None)
                if maps is not None and png:
                    maps(Pair(row["a"], row["b"]), png)
                row["error"] = row["error"] or ""
                for sink in sinks:
                    sink(row)
                if row["error"]:
                    stats.failed += 1
                    stats.failures.append(row)
                    if progress:
                        progress.message(f"perceptual-engine: failed: {row['a']} | {row['b']}: "
                                         f"{row['error']}")
                else:
                    stats.ok += 1
                if progress:
                    progress.advance()
    end = time.perf_counter()
    stats.wall_s = end - start
    stats.startup_s = (first or end) - start
    if job.total is None:
        stats.total = stats.ok + stats.failed + stats.skipped
    if progress:
        progress.close()
    return stats
