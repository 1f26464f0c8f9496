"""``perceptual-engine distance A B --ray``: the distance command on a Ray cluster.

Pairs, model, rows, result files and the summary line are the single-machine
command's; only where the work runs differs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from ..datasets.runner import row_terms
from .common import report_interrupt


def run_distance(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """The --ray path. Flags are those of the single-process path (the table in
    cli/distance_flags.py says which it refuses; cmd_distance checked them)."""
    from .distance_flags import ensure_model_file, model_request
    from ..datasets.pairs import pairs_from_args
    from ..datasets.results import StdoutRows, check_output_path
    from ..datasets.runner import Progress
    from ..runtime import read_info
    from ..distributed.job import import_ray, start_ray, write_distances

    import_ray()  # before any work: without Ray, say how to install it
    pairs = pairs_from_args(args.a, args.b, args.pairs)
    if args.output:
        check_output_path(args.output, resume=args.resume)  # before a model is exported or Ray started
    # Exported (or found in the cache) here, once, by the single path's rules; the
    # actors only load it.
    req = model_request(args)
    model = ensure_model_file(req, args.cache_dir, say)
    terms = row_terms(read_info(model).output_names)
    maps = None
    if args.spatial_dir is not None:
        from ..datasets.spatial import MapWriter

        maps = MapWriter(args.spatial_dir)
    width = min(max(max(len(p.a), len(p.b)) for p in pairs), 60)
    screen = StdoutRows(sys.stdout, args.format, terms, path_width=width)
    where = args.ray_address or "a local Ray sized to this machine"
    say(f"{len(pairs)} pair(s) on Ray ({where})")
    bar = Progress(len(pairs), sys.stderr, enabled=sys.stderr.isatty())
    t0 = time.perf_counter()
    started = start_ray(args.ray_address)
    if started:
        say(f"Ray {'connected' if args.ray_address else 'started'} in "
            f"{time.perf_counter() - t0:.1f} s")
    try:
        stats = write_distances(
            pairs=pairs, model=model, output=args.output, resume=args.resume,
            sinks=[screen.write], progress=bar, say=say, size_policy=args.size_policy,
            batch_size=args.batch_size, actors=args.ray_actors, device=args.device,
            precision=args.precision,
            max_pixels=args.max_pixels, max_side=args.max_side,
            memory_budget=getattr(args, "memory_budget", None), cache_dir=args.cache_dir,
            maps=maps.write_png if maps is not None else None)
    except KeyboardInterrupt:
        return report_interrupt(bar, args.output)
    finally:
        screen.close()
        if started:
            import ray

            ray.shutdown()
    say(stats.summary())
    if maps is not None:
        say(f"{maps.count} spatial map(s) in {args.spatial_dir} (PNG, white = the map's maximum)")
    return 0 if stats.failed == 0 else 1
