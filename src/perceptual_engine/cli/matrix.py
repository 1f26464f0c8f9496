"""``perceptual-engine matrix``, ``nearest`` and ``dedup``: every pair of image sets at the
cost of one forward pass per image (docs/matrix.md).

matrix DIR [DIR2] -o OUT.npy|.csv|.parquet   all-pairs distances (DIR against itself:
                                             symmetric, zero diagonal), --summary for diversity
nearest QUERY GALLERY --k K [--threshold T]  rows (query, rank, match, distance)
dedup DIR --threshold T                      groups of images closer than T

An image that cannot be read keeps its row and column, marked (NaN in .npy, empty in
.csv, the reason in .parquet's error column and in the sidecar ``OUT.meta.json``); the
exit status is then 1. A one-image set gives a 1x1 matrix [[0]].
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable


from .. import kinds
from ..errors import ConfigError
from .matrix_out import _Bar
from .options import (add_device_options, add_head_options, add_spec_options, distance_threshold,
                      memory_budget, positive_int)

MATRIX_FORMATS = {".npy": "npy", ".csv": "csv", ".parquet": "parquet"}
ROW_FORMATS = ("table", "csv", "json")


def register(sub: Any, say: Callable[[str], None], fmt: Any) -> None:
    """Add the three commands to the CLI's subparsers."""
    from ..images import SIZE_POLICIES
    from ..runtime import DEVICES

    specs = (
        ("matrix", "all-pairs distance matrix of one or two image folders",
         "The N x N distances within DIR (symmetric, zero diagonal) or N x M from DIR to DIR2, "
         "one forward pass per image and one GEMM per term."),
        ("nearest", "the K closest GALLERY images to each QUERY image",
         "Rows (query, rank, match, distance); QUERY and GALLERY are folders or image files. "
         "A query is never matched with its own file."),
        ("dedup", "groups of near-duplicate images in one folder",
         "Groups of images linked by distances <= --threshold (single linkage); rows (group, "
         "image, closest, distance) for groups of two or more."),
    )
    for name, short, long in specs:
        p = sub.add_parser(name, formatter_class=fmt, help=short, description=long,
                           epilog="exit status: 0 done, 1 some image unreadable (or an error), "
                                  "2 usage error; docs/matrix.md")
        if name == "matrix":
            p.add_argument("a", metavar="DIR", help="image folder")
            p.add_argument("b", metavar="DIR2", nargs="?", help="second folder (rows DIR, columns DIR2)")
            p.add_argument("-o", "--output", metavar="OUT.npy|.csv|.parquet",
                           help=".npy/.csv: the --term matrix, rows and columns in sorted path "
                                "order; .parquet: one row per entry with every term")
            p.add_argument("--term", default="total", help="the matrix in .npy/.csv (default: total)")
            p.add_argument("--summary", action="store_true",
                           help="print mean, median, min and max of the pairwise totals (diversity)")
        elif name == "nearest":
            p.add_argument("a", metavar="QUERY", help="image folder or file")
            p.add_argument("b", metavar="GALLERY", help="image folder or file")
            p.add_argument("--k", type=positive_int, default=5, help="matches per query (default: 5)")
            p.add_argument("--threshold", type=distance_threshold, metavar="T",
                           help="only matches with distance <= T (a finite number >= 0)")
        else:
            p.add_argument("a", metavar="DIR", help="image folder")
            p.add_argument("--threshold", type=distance_threshold, metavar="T", required=True,
                           help="images whose total distance is <= T are duplicates (a finite "
                                "number >= 0)")
        if name != "matrix":
            p.add_argument("--format", choices=ROW_FORMATS, default="table", help="default: table")
        p.add_argument("--model", metavar="ONNX", help="an exported lpips or distance model; without "
                       "it one is exported from the spec flags into the cache once")
        p.add_argument("--graph", choices=kinds.names(matrix=True),
                       help="the model exported from the spec flags; with --model, the kind the "
                            "model must be (default: distance, or the kind of --model)")
        p.add_argument("--cache-dir", metavar="DIR", help="model cache (as for distance)")
        add_device_options(p, DEVICES)
        p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                       help="images per forward call, lowered to fit the memory budget (default: 16)")
        p.add_argument("--size-policy", choices=SIZE_POLICIES, default="error",
                       help="images of different sizes: error (sizes named), resize all to the first "
                            "image's size, or center-crop all to the smallest (default: error)")
        p.add_argument("--max-pixels", type=positive_int, metavar="N",
                       help="refuse larger images before decoding (default: as distance)")
        p.add_argument("--workers", type=positive_int, metavar="N", help="decoding threads")
        p.add_argument("--memory-budget", type=memory_budget, metavar="SIZE",
                       help="embeddings, blocks and batches are sized under it; embeddings spill "
                            "to disk beyond it (default: 80%% of the available memory)")
        p.add_argument("--embed-dtype", choices=("float32", "float16"), default="float32",
                       help="how embeddings are stored (float16: half the memory; docs/matrix.md)")
        p.add_argument("--spill-dir", metavar="DIR", help="folder for spilled embeddings "
                       "(default: the system's temporary folder)")
        p.add_argument("--ray", action="store_true", help="compute the embeddings on Ray Data "
                       "(perceptual-engine[ray]; docs/scale.md)")
        p.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster")
        add_spec_options(p)
        add_head_options(p, spatial_flag=False, matrix=True)
        p.set_defaults(func=lambda a, _n=name: run(_n, a, say), spatial_dir=None)


def run(command: str, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    import contextlib

    from .._io import LockBusy, file_lock
    from ..datasets.results import check_output_path, lock_path

    if command == "matrix" and not (args.output or args.summary):
        raise ConfigError("matrix needs -o OUT.npy|.csv|.parquet, --summary, or both.")
    if args.ray_address and not args.ray:
        raise ConfigError("--ray-address goes with --ray.")
    _embedding_precision(args, say)
    args.model_kinds = {"command": command, "kind_filter": {"matrix": True}}  # for --model's check
    out_format = None
    with contextlib.ExitStack() as stack:
        if command == "matrix" and args.output:
            ext = os.path.splitext(args.output)[1].lower()
            if ext not in MATRIX_FORMATS:
                raise ConfigError(f"-o {args.output!r} has extension {ext!r}; accepted: "
                                  f"{', '.join(MATRIX_FORMATS)}.")
            out_format = MATRIX_FORMATS[ext]
            check_output_path(args.output, "-o")
            from ..datasets.results import sidecar_path

            side = sidecar_path(args.output)
            if os.path.isdir(side) or (os.path.exists(side) and not os.access(side, os.W_OK)):
                raise ConfigError(f"-o {args.output!r}: its sidecar {side!r} (the rows' and columns' "
                                  f"names) is {'a folder' if os.path.isdir(side) else 'not writable'}; "
                                  "remove it or give another -o.")
            try:  # held from before any work to the rename: one writer per file
                stack.enter_context(file_lock(lock_path(args.output), wait=False,
                                              note=f"perceptual-engine (pid {os.getpid()})"))
            except LockBusy as exc:
                raise ConfigError(f"-o {args.output!r} is being written by another run "
                                  f"({exc.holder or 'another process'}); wait for it or give "
                                  "another -o.") from None
        return _run(command, args, out_format, say)


def _embedding_precision(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Embeddings run in f32 on every device: in bf16 their rounding is as large as a
    near-duplicate's distance (docs/matrix.md), so bf16 is refused, and auto is f32."""
    if args.precision == "bf16":
        raise ConfigError("--precision bf16 is not accepted by matrix, nearest and dedup: bf16 "
                          "embeddings are off by as much as a near-duplicate's distance, which no "
                          "recompute from the stored embeddings can undo. Accepted: --precision f32 "
                          "or auto (both f32; --device openvino runs OpenVINO f32).")
    if args.device == "openvino" and args.precision == "auto":
        say("--device openvino runs the embeddings in f32 (bf16 would put near-duplicates outside "
            "its accuracy tier)")
    args.precision = "f32"


def _run(command: str, args: argparse.Namespace, out_format: str | None,
         say: Callable[[str], None]) -> int:
    from .. import images
    from . import matrix_out
    from ..datasets.imageset import ImageSet, Loader, common_size
    from .distance import _open_engine

    max_pixels = args.max_pixels or images.MAX_IMAGE_PIXELS
    sets = [ImageSet(args.a, max_pixels=max_pixels)]
    b = getattr(args, "b", None)
    same = b is not None and os.path.realpath(b) == os.path.realpath(args.a)
    if b is not None and not same:
        sets.append(ImageSet(b, max_pixels=max_pixels))
    engine = _open_engine(args)
    from ..runtime.matrix import Embedder, gemm_device, plan

    emb = Embedder.of(engine)
    if command == "matrix" and args.term not in (*emb.terms, "total"):
        raise ConfigError(f"--term {args.term!r} is not a term of this model; accepted: "
                          f"{', '.join((*emb.terms, 'total'))}.")
    size = common_size(sets, args.size_policy, engine.spec.min_size)
    n = len(sets[0])
    m = len(sets[1]) if len(sets) > 1 else 0
    p = plan(engine, emb, n, m, size[0], size[1], batch_size=args.batch_size,
             store_dtype=args.embed_dtype, outputs=command == "matrix")
    loader = Loader(size, args.size_policy, engine.spec.input_range, max_pixels, args.workers)
    say(f"{n}{f' x {m}' if m else ''} image(s) of {size[0]}x{size[1]} on {engine.providers[0]}; "
        f"embeddings {'spilled to disk' if p.spill else 'in memory'}, {args.embed_dtype}, "
        f"{p.batch} image(s) per call, blocks of {p.block}"
        + ("" if not engine.on_gpu else f", GEMM on {gemm_device(engine)}"))
    stores = _embed(args, engine, emb, sets, loader, p, say)
    try:
        if command == "matrix":
            matrix_out.write_matrix(args, engine, emb, sets, stores, p, out_format, say)
        elif command == "nearest":
            matrix_out.nearest(args, engine, emb, sets, stores, p)
        else:
            matrix_out.dedup(args, engine, emb, sets, stores, p, say)
    finally:
        for s in stores:
            s.close()
    failed = sum(len(s.errors) for s in stores)
    if failed:
        for st, s in zip(sets, stores):
            for i, why in sorted(s.errors.items()):
                say(f"unreadable: {st.names[i]}: {why}")
    return 1 if failed else 0


def _embed(args, engine, emb, sets, loader, p, say) -> list:
    from ..runtime.embstore import EmbeddingStore
    from ..datasets.imageset import fill_store

    stores = []
    bar = _Bar(sum(len(s) for s in sets), "images")
    try:
        for st in sets:
            store = EmbeddingStore(len(st), emb.dims(*loader.size), dtype=args.embed_dtype,
                                   spill=p.spill, spill_dir=args.spill_dir)
            stores.append(store)
            if args.ray:
                from ..distributed.matrix import fill_store_ray

                fill_store_ray(engine.path, st, store, loader, p.batch, address=args.ray_address,
                               device=args.device, progress=bar.bar.advance, say=say)
            else:
                fill_store(emb, st, store, loader, p.batch, progress=bar.bar.advance)
    except BaseException:
        for s in stores:
            s.close()
        raise
    finally:
        bar.bar.close()
    return stores
