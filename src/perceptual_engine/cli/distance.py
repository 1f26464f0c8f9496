"""``perceptual-engine distance``: the model the flags ask for, then pairs to rows."""
from __future__ import annotations

import argparse
import sys

from .common import report_interrupt, say as _say
from .options import say_device
from .. import kinds
from ..errors import PerceptualError


def _open_engine(args: argparse.Namespace):
    """The Engine of the model the flags ask for (distance_flags.model_request)."""
    from .distance_flags import check_model, check_model_file, model_request
    from ..runtime import Engine

    req = model_request(args)
    if req.model:
        check_model_file(req)  # metadata only: a wrong kind is refused before a session starts
        engine = Engine(req.model, args.device, precision=args.precision)
    else:
        from ..datasets.cache import models_dir, open_engine

        engine, entry = open_engine(req.spec, req.loss, device=args.device, dtype=req.dtype,
                                    precision=args.precision,
                                    folder=models_dir(args.cache_dir), say=_say,
                                    graph=req.graph, **req.extra())
        if not entry.built:
            _say(f"using the cached model {entry.path}")
    check_model(req, engine.info)
    engine.memory_budget = getattr(args, "memory_budget", None)
    say_device(args.device, engine, _say)
    return engine


def cmd_distance(args: argparse.Namespace) -> int:
    from ..datasets.pairs import pairs_from_args
    from ..datasets.results import ResultFile, StdoutRows, check_output_path, model_identity
    from ..datasets.runner import Progress, row_terms, run_pairs
    from .distance_flags import RAY, SINGLE, check_flags

    check_flags(args, RAY if args.ray else SINGLE, getattr(args, "flag_defaults", {}))
    if args.ray:
        from .ray import run_distance

        return run_distance(args, _say)
    pairs = pairs_from_args(args.a, args.b, args.pairs)
    if args.output:
        check_output_path(args.output, resume=args.resume)  # before a model is exported or loaded
    engine = _open_engine(args)
    terms = row_terms(engine.output_names)  # per-pair scalars only
    maps = None
    if args.spatial_dir is not None:
        from ..datasets.spatial import MapWriter

        maps = MapWriter(args.spatial_dir)
    sinks, closers = [], []
    skip: set[tuple[str, str]] = set()
    if args.output:
        outfile = ResultFile(args.output, terms, resume=args.resume,
                             identity=model_identity(engine.info))
        skip = outfile.done
        sinks.append(outfile.write)
        closers.append(outfile.close)
    todo = sum(p.key not in skip for p in pairs)
    _say(f"{len(pairs)} pair(s) on {engine.providers[0]}"
         + (f", {len(pairs) - todo} already in {args.output}" if skip else ""))
    width = min(max(max(len(p.a), len(p.b)) for p in pairs), 60)
    screen = StdoutRows(sys.stdout, args.format, terms, path_width=width)
    sinks.append(screen.write)
    closers.append(screen.close)
    bar = Progress(todo, sys.stderr, enabled=sys.stderr.isatty())
    try:
        stats = run_pairs(engine, pairs, sinks, batch_size=args.batch_size,
                          size_policy=args.size_policy, workers=args.workers, skip=skip,
                          max_pixels=args.max_pixels, max_side=args.max_side, progress=bar,
                          maps=maps.write if maps is not None else None)
    except KeyboardInterrupt:
        return report_interrupt(bar, args.output)
    finally:
        _close_all(closers)
    _say(stats.summary())
    if maps is not None:
        _say(f"{maps.count} spatial map(s) in {args.spatial_dir} (PNG, white = the map's maximum)")
    return 0 if stats.failed == 0 else 1


def _close_all(closers) -> None:
    """Close every sink, then raise the first failure (a result file that is no longer ours)."""
    failure = None
    for close in closers:
        try:
            close()
        except PerceptualError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _check_distance_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot express; errors exit 2 with the subcommand's usage."""
    if args.command != "distance":
        return
    sub = parser.subcommands["distance"]  # type: ignore[attr-defined]
    if args.pairs and (args.a or args.b):
        sub.error("give A B or --pairs CSV, not both")
    if not args.pairs and not (args.a and args.b):
        sub.error("give two images, two folders, or --pairs CSV")
    if args.resume and not args.output:
        sub.error("--resume needs --output (the file to resume)")
    # Flags one path refuses are checked by cmd_distance (distance_flags.FLAGS), as one line.
    args.flag_defaults = {a.dest: a.default for a in sub._actions}
    if args.spatial_dir and not args.model and not kinds.get(args.graph or "distance").spatial:
        sub.error("--spatial-dir writes LPIPS maps: add --graph lpips (or --model with an LPIPS "
                  "model exported with --spatial)")

