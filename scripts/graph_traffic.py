#!/usr/bin/env python3
"""Glue traffic of the exported graphs: bytes read and written by every op that is not
a convolution, a matrix product, a pool or a copy-free view, at a given batch and size.

    python3 scripts/graph_traffic.py                       # the six graphs, batch 8, 224², float16
    python3 scripts/graph_traffic.py --batch 8 --size 224 --dtype float16 --json out.json
    python3 scripts/graph_traffic.py --model m.onnx        # one model file, any kind

On a GPU these ops are memory-bound: at ~3.5 TB/s every GB is ~0.3 ms before any
launch cost, while the convolutions and products are what the graph is for. The
figure is a lower bound on what the ops move (each input read once, each output
written once); it needs no GPU and no run, only shape inference on the graph with
its inputs fixed to the given shapes (ONNX Runtime's symbolic shape inference).

The six graphs (random weights; the figures do not depend on the weights):

| name         | what                                                                  |
|--------------|-----------------------------------------------------------------------|
| features     | VGG19 to relu4_4, taps relu1_2, relu2_2, relu3_4, relu4_4             |
| distance     | the same network, content relu2_2 + style on the four taps            |
| train        | distance + grad.x                                                     |
| stylize-step | target graph + grad.x (content relu2_2, style on the four taps), batch 1 in use, measured at --batch |
| lpips        | LPIPS on VGG16                                                        |
| dists        | DISTS on VGG16                                                        |

Inputs x and y each get --batch images, so a distance graph's network sees 2·batch.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

# Ops that are the graph's real work (compute-bound, or what torch runs as one kernel too).
WORK_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedMatMul", "MaxPool", "AveragePool",
                      "LpPool", "GlobalAveragePool", "GlobalMaxPool"})
# Views: no data moves (or only a few int64 values).
VIEW_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Shape", "Constant", "Size"})
BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # onnx TensorProto dtypes

STYLE = ("relu1_2", "relu2_2", "relu3_4", "relu4_4")
GRAPHS = ("features", "distance", "train", "stylize-step", "lpips", "dists")


def _fixed_inputs(model, batch: int, size: int) -> dict[str, list[int]]:
    """Concrete shapes of the model's inputs for images (batch, 3, size, size)."""
    from perceptual_engine.export.metadata import ModelInfo
    from perceptual_engine import layers

    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props}, "<model>")
    shapes: dict[str, list[int]] = {}
    for value in model.graph.input:
        name = value.name
        dims = [d.dim_value if d.dim_value else None for d in value.type.tensor_type.shape.dim]
        if name in ("x", "y"):
            shapes[name] = [batch, 3, size, size]
        elif name.startswith("target.content."):
            ds = layers.resolve(info.spec.arch, name.removeprefix("target.content.")).downsample
            shapes[name] = [1, dims[1], size // ds, size // ds]
        else:
            shapes[name] = [d if d is not None else 1 for d in dims]
    return shapes


def measure(model, batch: int = 8, size: int = 224) -> dict:
    """{"nodes", "glue_nodes", "glue_bytes", "by_op": {op: bytes}} of an ONNX model
    (a ModelProto or a path), with its image inputs fixed to (batch, 3, size, size)."""
    import onnx

    _Inference = _symbolic()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    model = _without_weights(model)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for d, n in zip(dims, _fixed_inputs(model, batch, size)[value.name]):
            d.Clear()
            d.dim_value = n
    del model.graph.value_info[:]
    # onnx's own inference first (it knows every opset-18+ reduction), then ORT's
    # symbolic inference for what data propagation leaves open (Reshape targets).
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    inference = _Inference(2**31 - 1, True, False, 0)  # as SymbolicShapeInference.infer_shapes does
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    inferred = inference.out_mp_
    known: dict[str, int] = {}
    dims_of: dict[str, list] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims):
            continue
        dims_of[value.name] = dims
        n = 1
        for d in dims:
            n *= d
        known[value.name] = n * BYTES.get(t.elem_type, 4)
    for init in inferred.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        known[init.name] = n * BYTES.get(init.data_type, 4)
        dims_of[init.name] = list(init.dims)
    by_op: collections.Counter = collections.Counter()
    unknown: set[str] = set()
    glue = 0
    for node in inferred.graph.node:
        if node.op_type in VIEW_OPS or (node.op_type in WORK_OPS and not _thin(node, inferred, dims_of)):
            continue
        glue += 1
        for name in (*node.input, *node.output):
            if not name:
                continue
            if name not in known:
                unknown.add(name)
                continue
            by_op[node.op_type] += known[name]
    return {"nodes": len(inferred.graph.node), "glue_nodes": glue, "glue_bytes": sum(by_op.values()),
            "by_op": dict(by_op.most_common()), "unknown_shapes": len(unknown)}


def _thin(node, model, dims_of) -> bool:
    """A product or convolution that does almost no arithmetic per byte (a reduction
    length of at most 4, such as a difference written as a MatMul with (1, -1)) is
    memory-bound glue like any elementwise op, and is counted as such."""
    if node.op_type in ("MatMul", "FusedMatMul", "Gemm") and len(node.input) >= 2:
        a = dims_of.get(node.input[0])
        return a is not None and len(a) >= 1 and a[-1] <= 4
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) >= 2:
        w = dims_of.get(node.input[1])
        return w is not None and len(w) == 4 and w[1] * w[2] * w[3] <= 4
    return False


def _symbolic():
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    class Inference(SymbolicShapeInference):
        """ORT's symbolic inference, with ReduceMax/Min/L2/SumSquare read like ReduceSum
        (opset 18 moved their axes to an input, which ORT's tool reads for ReduceSum
        and ReduceMean only)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for op in ("ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceL1", "ReduceLogSumExp"):
                self.dispatcher_[op] = self._infer_ReduceSum

    return Inference


def _without_weights(model):
    """A copy whose large weights keep their dims but no data (shape inference only
    needs their dims; 40-550 MB of weights need not be copied around). Weights are the
    initializers that only convolutions and products read: ORT's symbolic inference
    reads the value of every input of an Add, Mul, Sub or Div, so a large constant
    that one of those reads (a per-channel factor, say) keeps its data."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    readers: dict[str, set[str]] = collections.defaultdict(set)
    for node in out.graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    for init in out.graph.initializer:
        if init.raw_data and len(init.raw_data) > 4096 and readers[init.name] <= WORK_OPS:
            init.ClearField("raw_data")
    return out


def export_graphs(folder: str, dtype: str = "float16", names=GRAPHS, verify: bool = False,
                  progress=print, **options) -> dict[str, str]:
    """Export the named graphs (random weights) into folder: {name: path}."""
    import warnings

    from perceptual_engine import FeatureSpec, LossConfig, export_onnx
    from perceptual_engine import dists, lpips

    spec = FeatureSpec(arch="vgg19", layers=STYLE, weights="random", seed=0)
    loss = LossConfig(content={"relu2_2": 1.0}, style={n: 1.0 for n in STYLE})
    jobs = {
        "features": dict(spec=spec, graph="features"),
        "distance": dict(spec=spec, graph="distance", loss=loss),
        "train": dict(spec=spec, graph="distance", loss=loss, grad=True),
        "stylize-step": dict(spec=spec, graph="target", loss=loss, grad=True),
        "lpips": dict(spec=lpips.default_spec("random"), graph="lpips"),
        "dists": dict(spec=dists.default_spec("random"), graph="dists"),
    }
    out = {}
    for name in names:
        path = os.path.join(folder, f"{name}.{dtype}.onnx")
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job = dict(jobs[name])
            export_onnx(job.pop("spec"), path, dtype=dtype, verify=verify, **job, **options)
        progress(f"exported {name} ({dtype}) in {time.perf_counter() - start:.1f} s")
        out[name] = path
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| graph | nodes | glue nodes | glue traffic | largest |", "|---|---|---|---|---|"]
    for name, r in results.items():
        top = ", ".join(f"{op} {b / 1e9:.2f}" for op, b in list(r["by_op"].items())[:4])
        lines.append(f"| {name} | {r['nodes']} | {r['glue_nodes']} | {r['glue_bytes'] / 1e9:.2f} GB | {top} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=GRAPHS)
    p.add_argument("--model", action="append", help="measure this model file instead (repeatable)")
    p.add_argument("--keep", metavar="DIR", help="export into DIR and keep the models (reused if present)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.model:
        paths = {os.path.basename(m): m for m in args.model}
        results = {name: measure(path, args.batch, args.size) for name, path in paths.items()}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep or tmp
            os.makedirs(folder, exist_ok=True)
            have = {n: os.path.join(folder, f"{n}.{args.dtype}.onnx") for n in args.graphs}
            missing = [n for n, pth in have.items() if not os.path.exists(pth)]
            if missing:
                export_graphs(folder, args.dtype, missing)
            results = {n: measure(pth, args.batch, args.size) for n, pth in have.items()}
    print(f"glue traffic at batch {args.batch}, {args.size}x{args.size}, {args.dtype}:")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "dtype": args.dtype, "graphs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
