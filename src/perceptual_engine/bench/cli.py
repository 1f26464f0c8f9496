"""`perceptual-engine bench` (and `python -m perceptual_engine.bench`): options and entry.

The main CLI calls ``add_arguments(subparser)`` and ``main(namespace)``; this module
only parses, calls ``bench.run`` and writes the three reports.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Callable

from .._io import atomic_write_bytes
from ..errors import ConfigError, PerceptualError

DESCRIPTION = """\
Time every variant (PyTorch eager/fp16/bf16/compile, ONNX Runtime CPU/CUDA/TensorRT)
on the same inputs in one run, check each against the float32 PyTorch reference,
and write bench.md (table), bench.json (environment and raw samples) and bench.png
(throughput plot) into --out. Variants that cannot run here are listed as skipped
with the reason. --quick: one size (224), batches 1 and 4, features and distance,
3 timed calls: under a minute on a 2-core CPU.

Exit status: 0 when every measured variant agrees with the reference within its
precision's tolerance; 1 when some result is WRONG (the reports are still written)
or on an error; 2 for a usage or configuration error; 130 when interrupted with
Ctrl-C (the reports of the rows measured so far are written).
"""


def _list(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give a comma-separated list, e.g. 224,512")
        try:
            return tuple(kind(t) for t in items)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench options to ``parser`` (a subcommand's or a standalone one)."""
    from .variants import REGISTRY
    from .workloads import WORKLOADS
    from ..layers import ARCHS

    if parser.description is None:
        parser.description = DESCRIPTION
    if parser.epilog is None:  # one name a line: help text wrapping would split names at hyphens
        parser.epilog = "variants:\n" + "\n".join(f"  {name:<24} {v.description}"
                                                   for name, v in REGISTRY.items())
    what = parser.add_argument_group("what to measure")
    what.add_argument("--workloads", type=_list(str), default=None, metavar="LIST",
                      help=f"comma-separated, of {', '.join(WORKLOADS)} (default: "
                           "features,distance,style; --quick: features,distance; lpips: "
                           "LPIPS against the lpips package, VGG16, needs it installed; "
                           "lpips-alex, lpips-squeeze: the same on AlexNet, SqueezeNet 1.1; "
                           "dists: DISTS against DISTS_pytorch; metrics: torchmetrics' LPIPS "
                           "update loop against the engine)")
    what.add_argument("--sizes", type=_list(int), default=None, metavar="LIST",
                      help="square image sides in pixels (default: 224,512; --quick: 224; "
                           "train: 224, stylize-step: 512; --quick: 64 for both)")
    what.add_argument("--batch-sizes", type=_list(int), default=None, metavar="LIST",
                      help="batch sizes (default: 1,8,32; --quick: 1,4; train --quick: 1; "
                           "stylize-step: always 1)")
    what.add_argument("--variants", type=_list(str), default=None, metavar="LIST",
                      help="comma-separated variants, or 'all' (default); listed below")
    what.add_argument("--quick", action="store_true",
                      help="small, fast run (see above); torch-compile is skipped")
    how = parser.add_argument_group("how to measure")
    how.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where the PyTorch and GPU variants run; auto: cuda if present (default)")
    how.add_argument("--iters", type=int, default=None,
                     help="timed calls per point (default: 20; --quick: 3)")
    how.add_argument("--warmup", type=int, default=None,
                     help="untimed calls before timing (default: 3; --quick: 1)")
    how.add_argument("--input-sets", type=int, default=3,
                     help="distinct input sets rotated through the calls (default: 3)")
    how.add_argument("--no-peak", action="store_true",
                     help="skip the matrix-product ceiling measurement (no %% of peak)")
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default="random",
                       help="'random' (seeded, default: no download), 'imagenet' or a "
                            ".pth/.safetensors file")
    model.add_argument("--arch", choices=ARCHS, default="vgg19")
    model.add_argument("--layers", type=_list(str), default=None, metavar="LIST",
                       help="layer names (default: relu1_2,relu2_2,relu3_4,relu4_4 for vgg19)")
    model.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="bench-out", metavar="DIR",
                     help="folder for bench.md, bench.json and bench.png (default: bench-out)")
    out.add_argument("--cache-dir", default=None, metavar="DIR",
                     help="keep exported models here between runs (default: a temporary folder)")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _command(args: argparse.Namespace) -> str:
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "perceptual-engine":
        return shlex.join(["perceptual-engine", *sys.argv[1:]])
    if argv0.endswith(os.path.join("bench", "__main__.py")):
        return shlex.join(["python", "-m", "perceptual_engine.bench", *sys.argv[1:]])
    # Called in-process: rebuild an equivalent command from the options.
    parts = ["perceptual-engine", "bench"]
    for name in ("workloads", "sizes", "batch_sizes", "variants", "layers"):
        value = getattr(args, name, None)
        if value:
            parts += [f"--{name.replace('_', '-')}", ",".join(map(str, value))]
    for name in ("device", "iters", "warmup", "input_sets", "weights", "arch", "seed", "out"):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    parts += [f"--{f}" for f in ("quick", "no_peak") if getattr(args, f, False)]
    return shlex.join(p.replace("_", "-") if p.startswith("--") else p for p in parts)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark of ``args`` and write the reports.

    Returns 0 when every measured variant agreed with the reference, 1 when some
    result is WRONG (the reports are written all the same) or on an error.
    """
    from . import BenchConfig, run
    from .report import to_json, to_markdown, to_png

    variants = args.variants
    if variants is not None and tuple(variants) == ("all",):
        variants = None
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        config = BenchConfig(
            workloads=args.workloads, sizes=args.sizes, batch_sizes=args.batch_sizes,
            variants=variants, device=args.device, iters=args.iters, warmup=args.warmup,
            input_sets=args.input_sets, quick=args.quick, weights=args.weights, arch=args.arch,
            layers=args.layers, seed=args.seed, cache_dir=args.cache_dir,
            measure_peak=not args.no_peak, command=_command(args),
        )
        result = run(config, progress=progress)
    except PerceptualError as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"perceptual-engine bench: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "bench.md")
    json_path = os.path.join(args.out, "bench.json")
    png_path = os.path.join(args.out, "bench.png")
    markdown = to_markdown(result)
    atomic_write_bytes(md_path, markdown.encode())
    atomic_write_bytes(json_path, json.dumps(to_json(result), indent=1).encode())
    wrote = [md_path, json_path]
    if to_png(result, png_path) is None:
        print("matplotlib is not installed: bench.png skipped (pip install matplotlib)",
              file=sys.stderr)
    else:
        wrote.append(png_path)
    print(markdown)
    print(f"wrote {', '.join(wrote)} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if result.interrupted:
        return 130
    wrong = [r for r in result.rows if r.status == "WRONG"]
    if wrong:
        print(f"perceptual-engine bench: {len(wrong)} result(s) WRONG (over their precision's "
              "tolerance, see the table): " + ", ".join(sorted({r.variant for r in wrong})),
              file=sys.stderr)
        return 1
    return 0
