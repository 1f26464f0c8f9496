"""``perceptual-engine distance A B --ray``: the distance command on a Ray cluster.

Pairs, model, rows, result files and the summary line are the single-machine
command's; only where the work runs differs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from ..cli.options import SPEC_FLAGS, spec_from_args
from ..cli.runner import row_terms
from ..errors import ConfigError


def run_distance(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from ..cli.pairs import pairs_from_args
    from ..cli.results import StdoutRows, check_output_path
    from ..cli.runner import Progress
    from ..runtime import read_info
    from .job import import_ray, resolve_model, start_ray, write_distances

    import_ray()  # before any work: without Ray, say how to install it
    pairs = pairs_from_args(args.a, args.b, args.pairs)
    if args.output:
        check_output_path(args.output)  # before a model is exported or Ray started
    given = [f for f in SPEC_FLAGS if getattr(args, f) is not None]
    if args.model and given:
        raise ConfigError(f"--model reads the spec from the model; drop "
                          f"{', '.join('--' + f.replace('_', '-') for f in given)}, or drop "
                          "--model to export one from the flags.")
    spec, loss = (None, None) if args.model else spec_from_args(args)
    # Exported (or found in the cache) here, once; the actors only load it.
    model = resolve_model(args.model, spec, loss, dtype=args.dtype or "float32",
                          cache_dir=args.cache_dir, say=say)
    terms = row_terms(read_info(model).output_names)
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
            memory_budget=getattr(args, "memory_budget", None))
    except KeyboardInterrupt:
        bar.close()
        kept = f"; the rows computed so far are in {args.output}, rerun with --resume" \
            if args.output else ""
        say(f"interrupted{kept}")
        return 130
    finally:
        screen.close()
        if started:
            import ray

            ray.shutdown()
    say(stats.summary())
    return 0 if stats.failed == 0 else 1
