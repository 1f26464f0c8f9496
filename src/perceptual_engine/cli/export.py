"""``perceptual-engine export``: export a verified ONNX model and print what was written."""
from __future__ import annotations

import argparse
import os

from .common import say as _say
from .. import kinds
from ..errors import ConfigError
from .options import head_kwargs, head_spec_from_args, spec_from_args

def static_shape_arg(text: str) -> tuple[int, int, int]:
    """--static-shape NxHxW -> (N, H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; accepted: BATCHxHEIGHTxWIDTH, "
                                         "three positive integers, e.g. 8x224x224")
    return int(parts[0]), int(parts[1]), int(parts[2])


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_onnx
    from ..export.exporter import FP16_CPU_NOTE, TOLERANCE

    if args.triton_name is not None and not args.triton_repo:
        raise ConfigError("--triton-name names the model in --triton-repo DIR; add --triton-repo.")
    triton_name = None
    if args.triton_repo:  # before the export: a bad name or repo must not cost one
        from ..export.triton import check_repo_entry

        triton_name = args.triton_name if args.triton_name is not None else \
            os.path.splitext(os.path.basename(args.output))[0]
        if args.static_shape:
            raise ConfigError("--triton-repo with --static-shape: Triton batches requests of any size "
                              "into the model; drop --static-shape for a Triton model.")
        check_repo_entry(args.triton_repo, triton_name, args.output)
    head_kw = head_kwargs(args, args.graph, bool(args.spatial), "--spatial")
    if kinds.get(args.graph).head:
        spec, loss = head_spec_from_args(args, args.graph), None
    else:
        spec, loss = spec_from_args(args)
    if args.graph == "features" and loss is not None:
        raise ConfigError("--content/--style/--gram describe a distance graph; add --graph "
                          "distance, or drop them to export features.")
    dtype = args.dtype or "float32"
    if args.fp16_outputs and (args.graph != "features" or dtype != "float16"):
        raise ConfigError(f"--fp16-outputs needs --graph features --dtype float16 (got --graph {args.graph} "
                          f"--dtype {dtype}); other graphs' terms stay float32.")
    r = export_onnx(spec, args.output, graph=args.graph, loss=loss, dtype=dtype,
                    progress=lambda m: _say(m), grad=args.grad, static_shape=args.static_shape,
                    fp16_outputs=args.fp16_outputs, **head_kw)
    print(f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB) in {r.seconds:.1f} s")
    out_dtype = "float16" if args.fp16_outputs else "float32"
    print(f"  graph     {r.graph}, {r.dtype} network, "
          + ("float32 inputs and outputs" if out_dtype == "float32" else f"float32 inputs, {out_dtype} outputs"))
    print(f"  spec      {spec.arch} {','.join(spec.layers)}; weights {spec.weights}"
          f"{f' (seed {spec.seed})' if spec.weights == 'random' else ''}, sha256 "
          f"{r.weights_sha256[:16]}; input range {spec.input_range}; {spec.pooling} pooling")
    if r.graph in ("distance", "style", "target"):
        from ..spec import LossConfig

        lc = loss or LossConfig.default_for(spec)
        terms = [f"content {k}={v:g}" for k, v in lc.content.items()]
        terms += [f"style {k}={v:g}" for k, v in lc.style.items()]
        print(f"  loss      {', '.join(terms)}; gram {lc.gram}")
    dims = ("(N, 3, H, W), N, H, W dynamic" if not args.static_shape
            else "({}, 3, {}, {}), static".format(*args.static_shape))
    images = [n for n in r.inputs if not n.startswith("target.")]
    print(f"  inputs    {', '.join(images)}: float32 {dims}"
          + ("; target.content.<l>: float32 (1, C, H_l, W_l)" if r.graph == "target" else "")
          + ("; target.gram.<l>: float32 (1, C, C)" if len(images) < len(r.inputs) else ""))
    kind = kinds.get(r.graph)
    if kind.head:
        from ..runtime import read_info

        head = getattr(read_info(r.path), kind.head) or {}
        print(f"  {kind.head:<9} {kind.weights_name} {head.get('weights_source')}, sha256 "
              f"{str(head.get('weights_sha256'))[:16]}; head in float32")
        scalars = [o for o in r.outputs if o not in ("spatial", "grad.x")]
        print(f"  outputs   {', '.join(scalars)}: float32 (N,)"
              + ("; spatial: float32 (N, 1, H, W)" if "spatial" in r.outputs else "")
              + ("; grad.x (N, 3, H, W)" if "grad.x" in r.outputs else ""))
    elif r.graph != "features":  # a loss graph: its terms and total
        print(f"  outputs   {', '.join(r.outputs)}: float32 (N,)"
              + ("; grad.x (N, 3, H, W)" if "grad.x" in r.outputs else "")
              + ("; feature.<l> (N, C, H_l, W_l)" if r.graph == "target" else "")
              + ("; gram.<l> (N, C, C)" if r.graph in ("style", "target") else ""))
    else:
        from .. import layers as _layers

        for name in r.outputs:
            info = _layers.resolve(spec.arch, name)
            print(f"  output    {name}: {out_dtype} (N, {info.channels}, H/{info.downsample}, "
                  f"W/{info.downsample})")
    print(f"  parity vs the PyTorch reference on ONNX Runtime CPU (tolerance "
          f"{TOLERANCE[dtype]:g} relative):")
    for name, e in r.errors.items():
        print(f"    {name:<20} max abs {e.max_abs:.2e}   max rel {e.max_rel:.2e}")
    if dtype == "float16":
        print(f"    note: {FP16_CPU_NOTE}")
    if args.triton_repo:
        from ..export.triton import write_triton_repo

        t = write_triton_repo(r.path, args.triton_repo, triton_name)
        print(f"wrote Triton model {t.folder} (config.pbtxt, 1/model.onnx), max_batch_size "
              f"{t.max_batch_size}; config " + ("checked against Triton's schema and the graph"
                                                if t.checked else t.note))
    return 0


