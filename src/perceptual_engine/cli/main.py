"""The ``perceptual-engine`` command: a thin argparse layer over the library.

Exit status: 0 success; 1 when some pair failed or the library raised an error
(one line on stderr, no traceback); 2 for usage and configuration errors;
130 when interrupted (SIGINT), 143 when terminated (SIGTERM), either after the same
clean-up. ``--traceback`` shows the full error (for bug reports).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import warnings
from typing import Sequence

from .common import INTERRUPTED, PROG, RECEIVED, check_interrupted, interrupt_status, interrupt_word, say as _say
from .distance import _check_distance_args, cmd_distance
from .export import cmd_export, static_shape_arg
from .options import (add_device_options, add_head_options,
                      add_memory_options, add_spec_options, positive_int, spec_from_args)
from .. import kinds
from ..errors import (ConfigError, DistsWeightsError, LinearWeightsError, PerceptualError,
                      WeightsError)


# -- commands -------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .info import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import default_loss, run_demo

    spec, loss = spec_from_args(args, default_loss=default_loss)
    built = loss.used_spec(spec)
    if args.size < built.min_size:
        raise ConfigError(f"--size {args.size} is too small for {built.deepest} "
                          f"({built.min_size}x downsampling); accepted: --size >= {built.min_size}.")
    return run_demo(spec, loss, out_dir=args.out_dir, photo=args.image, size=args.size,
                    device=args.device, precision=args.precision, dtype=args.dtype or "float32",
                    bench=not args.no_bench, lpips=not args.no_lpips, dists=not args.no_dists,
                    out=sys.stdout, err=sys.stderr)


# -- parser ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..images import MAX_IMAGE_PIXELS, SIZE_POLICIES
    from ..datasets.results import STDOUT_FORMATS
    from ..runtime import DEVICES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt,
        description="Fast VGG perceptual distances: export verified ONNX models, compute "
                    "distances between images, report the environment.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export", formatter_class=fmt, help="export a verified ONNX model",
                       description="Export a FeatureSpec to one self-contained ONNX file, verified "
                                   "with onnx.checker and against the PyTorch reference.")
    add_spec_options(p)
    p.add_argument("--graph", choices=kinds.names(),
                   default="features",
                   help="features: input x, one output per layer; distance: inputs x, y, "
                        "outputs content.<l>, style.<l>, total; target: x against cached "
                        "content features and style Grams (Engine.set_target); style: x against "
                        "a cached target's Grams (style terms only); lpips: LPIPS (VGG16, lpips "
                        "v0.1 weights), outputs lpips.<l>, total; dists: DISTS (VGG16 with L2 "
                        "pooling, DISTS_pytorch weights), outputs texture.<s>, structure.<s>, total "
                        "(default: features)")
    p.add_argument("--grad", action="store_true",
                   help="also output grad.x (N, 3, H, W), the gradient of the summed total with "
                        "respect to x (distance, target, lpips and dists graphs; docs/training.md)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument("--static-shape", metavar="NxHxW", type=static_shape_arg,
                   help="export for exactly this input shape, e.g. 8x224x224 (features, distance, lpips, "
                        "dists): fewer nodes, a fixed plan for CUDA graphs; the model refuses any other "
                        "shape (docs/gpu.md)")
    p.add_argument("--fp16-outputs", action="store_true",
                   help="with --graph features --dtype float16: the taps come out as float16 (no cast, "
                        "half the bytes)")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository "
                   "entry: DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx (see docs/scale.md)")
    p.add_argument("--triton-name", metavar="NAME", help="the Triton model name (default: the "
                   "stem of --output)")
    add_head_options(p, spatial_flag=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "distance", formatter_class=fmt, help="perceptual distances between images",
        description="Distance between two images, between the files of two folders (matched by "
                    "relative path), or between the pairs of a CSV file. One row per pair: both "
                    "paths, every content/style term, total, or the pair's error.",
        epilog="exit status: 0 every pair computed, 1 some failed (or an error), 2 usage error")
    p.add_argument("a", nargs="?", help="image file or folder")
    p.add_argument("b", nargs="?", help="image file or folder")
    p.add_argument("--pairs", metavar="CSV", help="two columns: image A, image B (instead of A B)")
    p.add_argument("--model", metavar="ONNX", help="an exported distance or lpips model; without "
                   "it one is exported from the spec flags into the cache once")
    p.add_argument("--graph", choices=kinds.names(compares=True),
                   help="the model exported from the spec flags: distance (content/style terms), "
                        "lpips (VGG16 LPIPS; default layers and arch) or dists (DISTS, VGG16 with "
                        "L2 pooling; inputs in [0, 1]); with --model, the kind the model must be "
                        "(default: distance, or the kind of --model)")
    p.add_argument("--spatial-dir", metavar="DIR", dest="spatial_dir",
                   help="--graph lpips: write each pair's LPIPS map as a PNG here (grey levels "
                        "scaled by the map's own maximum; see docs/lpips.md)")
    p.add_argument("--cache-dir", metavar="DIR", help="model cache (default: "
                   "$PERCEPTUAL_ENGINE_CACHE, else $XDG_CACHE_HOME/perceptual-engine, else "
                   "~/.cache/perceptual-engine)")
    add_device_options(p, DEVICES)
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="pairs of one size per engine call (default: 8)")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="error",
                   help="pairs of different sizes: error row, resize B to A, or center-crop both "
                        "to the common minimum (default: error)")
    p.add_argument("--output", metavar="FILE.csv|FILE.jsonl",
                   help="also write rows here, flushed one by one")
    p.add_argument("--resume", action="store_true",
                   help="keep the pairs already computed in --output and do only the rest")
    p.add_argument("--format", choices=STDOUT_FORMATS, default="table",
                   help="rows on stdout (default: table)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="image decoding threads (default: min(4, CPUs))")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse larger images before decoding (default: {MAX_IMAGE_PIXELS})")
    add_memory_options(p)
    g = p.add_argument_group("Ray (dataset scale; needs perceptual-engine[ray])")
    g.add_argument("--ray", action="store_true",
                   help="decode in Ray tasks and compute on a pool of Engine actors (one per GPU); "
                        "--output may then also be .parquet")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="a running Ray cluster (default: start a local Ray sized to this machine)")
    g.add_argument("--ray-actors", type=positive_int, metavar="N",
                   help="Engine actors (default: one per GPU; without GPUs, one per 4 CPUs)")
    add_spec_options(p)
    add_head_options(p, spatial_flag=False)
    p.set_defaults(func=cmd_distance)

    p = sub.add_parser("info", help="versions, GPU and execution providers that really load",
                       description="Report versions, CUDA/cuDNN, the GPU and which ONNX Runtime "
                                   "execution providers load on this machine (each is tried).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo", formatter_class=fmt, help="export, verify, measure distortions, time it",
        description="Export a distance model into --out-dir, print its parity errors, the "
                    "distances between a bundled photo and blurred/noisy/JPEG copies at three "
                    "strengths, and a quick ONNX Runtime vs PyTorch speed table.")
    p.add_argument("-o", "--out-dir", default="out", help="output folder (default: ./out)")
    p.add_argument("--image", metavar="PATH",
                   help="photo to distort (default: the bundled astronaut)")
    p.add_argument("--size", type=positive_int, default=224, metavar="PIXELS",
                   help="square side the photo is resized to (default: 224)")
    add_device_options(p, DEVICES)
    p.add_argument("--no-bench", action="store_true", help="skip the speed table")
    p.add_argument("--no-lpips", action="store_true", help="skip the LPIPS column (its model "
                   "is exported once into --out-dir)")
    p.add_argument("--no-dists", action="store_true", help="skip the DISTS column (its model "
                   "is exported once into --out-dir)")
    add_spec_options(p, default_layers="the arch's usual four; the demo's loss: content on "
                                       "relu2_2, style on every layer",
                     default_content="relu2_2=1 (else the deepest layer) when --style is not "
                                     "given either", default_style="1 on every layer when "
                                     "--content is not given either")
    p.set_defaults(func=cmd_demo)
    from . import stylize as stylize_cli

    p = sub.add_parser("stylize", formatter_class=fmt, help="optimize an image: CONTENT in "
                       "the style of STYLE (Gatys et al.)", description=stylize_cli.DESCRIPTION)
    stylize_cli.add_arguments(p)
    p.set_defaults(func=lambda a: stylize_cli.main(a, _say))
    from . import matrix as matrix_cli

    matrix_cli.register(sub, _say, fmt)  # matrix, nearest, dedup (docs/matrix.md)
    from . import serve as serve_cli

    serve_cli.register(sub, _say, fmt)  # serve (docs/serve.md)
    from ..bench import cli as bench_cli

    p = sub.add_parser("bench", help="time every variant on the same inputs; Markdown/JSON/PNG",
                       description=bench_cli.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.main)
    parser.subcommands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


# The library's messages name API arguments; on the command line, name the flags.
_CLI_WORDING = (
    (re.compile(r"\bdevice='(\w+)'"), r"--device \1"),
    (re.compile(r"\bprecision='(\w+)'"), r"--precision \1"),
    (re.compile(r"\bgraph='(\w+)'"), r"--graph \1"),
    (re.compile(r"\blpips_weights='([^']+)'"), r"--lpips-weights \1"),
    (re.compile(r"\bweights='([^']+)'"), r"--weights \1"),
    (re.compile(r"\bFeatureSpec\.layers\b"), "--layers"),
    (re.compile(r"\bgrad=True\b"), "--grad"),
    (re.compile(r"\bdtype='(\w+)'"), r"--dtype \1"),
)


def cli_wording(text: str) -> str:
    for pattern, flag in _CLI_WORDING:
        text = pattern.sub(flag, text)
    return text


def weights_hint(exc: BaseException) -> str:
    """The flag that fixes a weights error: LPIPS heads come from --lpips-weights, DISTS'
    alpha/beta from --dists-weights, the VGG trunk (of every graph) from --weights."""
    if isinstance(exc, LinearWeightsError):
        return (" On the command line: --lpips-weights PATH (a .pth with keys "
                "lin0..lin<K-1>.model.1.weight, one per tap of --lpips-net), or leave --lpips-weights "
                "out for the lpips package's v0.1 weights (pip install lpips).")
    if isinstance(exc, DistsWeightsError):
        return (" On the command line: --dists-weights PATH (a .pt with keys alpha and beta), "
                "or leave --dists-weights out for the DISTS_pytorch package's weights.pt "
                "(pip install DISTS_pytorch).")
    if isinstance(exc, WeightsError):
        return " On the command line: --weights PATH (.pth/.safetensors) or --weights random."
    return ""


def _one_line(exc: BaseException) -> str:
    text = cli_wording(str(exc).strip() or type(exc).__name__)
    first, _, rest = text.partition("\n")
    return first + (" [more with --traceback]" if rest.strip() else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Ctrl-C (SIGINT) or SIGTERM anywhere (start-up, an export, a model build, a run) ends
    with one line and exit status 130 (143 for SIGTERM); what was already written stays
    (exports and cache entries are atomic, result files keep their rows) and what was
    temporary (a half-written export, spilled embeddings, lock files) is removed. Both
    signals take the same path: the handler raises KeyboardInterrupt.
    """
    INTERRUPTED[0] = False
    RECEIVED[0] = None
    previous = _catch_signals()
    try:
        code = _main(argv)
        if code not in (130, 143):  # a command that reported its interrupt has said so
            check_interrupted()  # a Ctrl-C that was swallowed after the last progress line
        return interrupt_status() if code == 130 else code  # e.g. bench's 130 after SIGTERM
    except Exception:
        # A signal that lands inside a C extension's start-up (onnxruntime's import) comes
        # out as that extension's error ("ImportError: initialization failed"), raised from
        # our KeyboardInterrupt: it is the interrupt, already cleaned up on its way here.
        if not INTERRUPTED[0]:
            raise
        _say_interrupted()
        return interrupt_status()
    except KeyboardInterrupt:
        _say_interrupted()
        return interrupt_status()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say_interrupted() -> None:
    try:
        print(f"{PROG}: {interrupt_word()}", file=sys.stderr)
    except KeyboardInterrupt:  # a second Ctrl-C while saying so
        pass


def _catch_signals() -> dict[int, object]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (Python's own SIGINT behaviour) and
    record which came (common.INTERRUPTED, common.RECEIVED). Installed only in the main
    thread, and only over the default handlers (a SIGTERM ignored by whoever started us,
    or a handler of an embedding program, is kept). Returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced: dict[int, object] = {}

    def handler(signum, frame):
        INTERRUPTED[0] = True
        RECEIVED[0] = RECEIVED[0] or signum
        raise KeyboardInterrupt

    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        previous = signal.getsignal(sig)
        if previous is default:
            replaced[sig] = signal.signal(sig, handler)
    return replaced


def run() -> None:
    """The console entry point: ``sys.exit(main())``, with exit status 130 kept.

    A Ctrl-C that lands while a library runs Python code through the C API (torch's
    import does) marks the interpreter as "ended by KeyboardInterrupt" even though
    ``main`` handled it, and Python then ends the process by re-raising SIGINT (status
    -2, not 130) at shutdown. After an interrupted run everything written is already
    closed (atomic files, flushed rows), so the process leaves with 130 directly.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    if code in (130, 143):  # interrupted (SIGINT) or terminated (SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # os._exit skips the interpreter's shutdown: collect what the interrupted frames
        # left in reference cycles, so their finalizers (spill folders) run first.
        import gc

        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    # Pillow warns about images above its own pixel limit; the command line applies its
    # own budget (--max-pixels, checked from the header) and reports refusals as rows.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_distance_args(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except PerceptualError as exc:
        if args.traceback:
            raise
        hint = weights_hint(exc)
        print(f"{PROG}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:  # unwritable output, full disk: the user's to fix, not a bug
        if args.traceback:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
