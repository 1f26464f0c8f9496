"""Build and run a Ray Data distance job: pairs -> decode tasks -> Engine actors -> rows."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .. import kinds
from .._io import sha256_file
from ..datasets.pairs import Pair, pair_key, pairs_from_args
from ..datasets.results import Row
from ..datasets.runner import Progress, RunStats, row_terms
from ..errors import ConfigError, DeviceError, ModelError
from ..images import MAX_IMAGE_PIXELS, SIZE_POLICIES
from ..spec import INPUT_RANGES, FeatureSpec, LossConfig
from .stages import DistanceActor, decode_batch

INSTALL = "pip install 'perceptual-engine[ray]'"


def import_ray():
    """The ray module, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"Ray Data is not installed ({exc}); distances on Ray need it: "
                          f"{INSTALL}.") from exc
    return ray


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to ``address``, or start a local Ray sized to this machine, quietly.

    An already initialized Ray (``ray.init`` by the caller) is used as it is.
    Returns True if this call started or connected it (the caller shuts it down).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        ray.init(address=address, **kw)
    else:  # CPUs and GPUs detected by Ray; no dashboard for a one-off job
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)
    return True


def _quiet_data_context():
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command line draws its own
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # e.g. "progress bars disabled"
    return ctx


def resolve_model(model: str | None, spec: FeatureSpec | None, loss: LossConfig | None, *,
                  dtype: str = "float32", cache_dir: str | None = None,
                  say: Callable[[str], None] | None = None) -> str:
    """The path of a distance model: ``model`` as given, or ``spec``/``loss`` exported once
    into the command line's model cache (on the driver, never per actor)."""
    from ..runtime import read_info

    if (model is None) == (spec is None):
        raise ConfigError("give model= (an exported distance model) or spec= (and loss=) to "
                          "export one; not both, not neither.")
    if model is None:
        from ..datasets.cache import ensure_model, models_dir

        entry = ensure_model(spec, loss or LossConfig.default_for(spec), dtype=dtype,
                             folder=models_dir(cache_dir), say=say)
        model = entry.path
    info = read_info(os.fspath(model))
    if not kinds.get(info.graph).compares:
        raise ModelError(f"{model!r} is a {info.graph} graph; distances need a model exported "
                         f"with graph={kinds.quoted(kinds.names(compares=True))} (export --graph "
                         f"{'|'.join(kinds.names(compares=True))}).")
    return os.path.abspath(os.fspath(model))


@dataclass(frozen=True)
class Resources:
    actors: int
    actor_cpus: float
    actor_gpus: int
    decode_cpus: float
    threads: int | None  # ONNX Runtime intra-op threads per actor (CPU actors)


def plan_resources(cluster: dict[str, float], *, actors: int | None, num_gpus: int | None,
                   device: str) -> Resources:
    """One actor per GPU when the cluster has GPUs. On CPUs, a quarter of the cores
    (at least one) is left to the decode tasks and the actors share the rest.

    Decode tasks never reserve what an actor reserves: Ray Data fuses a task stage into
    the next actor stage when their resources are equal, and decoding would then run
    inside the actors instead of beside them.
    """
    cpus, gpus = float(cluster.get("CPU", 1.0)), int(cluster.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1 if gpus and device not in ("cpu", "openvino") else 0
    if num_gpus not in (0, 1):
        raise ConfigError(f"num_gpus={num_gpus}; accepted: 0 or 1 (one Engine per GPU).")
    if device in ("cuda", "tensorrt") and not (gpus and num_gpus):
        raise DeviceError(f"device {device!r} was asked for, but the Ray cluster has {gpus} GPU(s) "
                          f"and num_gpus={num_gpus}; add GPU nodes, or use device='cpu'.")
    if num_gpus:
        n = actors or gpus
        if n > gpus:
            raise ConfigError(f"{n} actor(s) with one GPU each, but the Ray cluster has {gpus} "
                              "GPU(s); ask for at most that many actors.")
        return Resources(n, 1.0, 1, 1.0, None)
    spare = max(1.0, float(int(cpus) // 4)) if cpus >= 2 else cpus / 2
    n = actors or max(1, int(cpus) // 4)
    per = (cpus - spare) / n
    if per < 0.5:
        raise ConfigError(f"{n} CPU actor(s) on a Ray cluster of {cpus:g} CPUs, {spare:g} of them "
                          f"left to decoding, is under half a core per actor; ask for at most "
                          f"{max(1, int(2 * (cpus - spare)))} actor(s).")
    return Resources(n, per, 0, 0.25, max(1, int(per)))


def _model_handle(path: str, share: str):
    """How actors reach the model: its path (one node, or a shared filesystem) or its bytes
    in the object store (put once; each node copies it to a local file once)."""
    import ray

    if share not in ("auto", "path", "object-store"):
        raise ConfigError(f"share={share!r}; accepted: auto, path, object-store.")
    if share == "auto":
        here = ray.util.get_node_ip_address()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        share = "path" if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here \
            else "object-store"
    if share == "path":
        return path
    with open(path, "rb") as fh:
        return (ray.put(fh.read()), sha256_file(path))


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
