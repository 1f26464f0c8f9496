"""Shape inputs read from tensors, never computed: a rewrite of the exported graph.

torch.export writes a Gram's ``flatten(2)`` as ``Reshape(f, Concat(N, C, H·W))`` with
H·W computed from the input's sides by integer Div and Mul, and the max-pool VJP's
crops the same way. On the CUDA provider (onnxruntime-gpu 1.31.1, H200) those small
integer results came out wrong: ``requested shape {4,64,52277600}`` for a (4, 64, 224,
160) feature, or H/2·W for H·W, in distance and gradient graphs (BENCHMARKS.md, "NVIDIA
H200"; onnxruntime issue 4829 has the same symptom from the same pattern), while the
slices of a Shape that fed the same Concat were right.

So every Reshape target and Slice end that is computed is rebuilt from the exporter's
own symbolic shapes (value_info): each dimension becomes a constant, a slice of the
Shape of a tensor that already has that dimension (the reshaped input included), or
the one -1 that Reshape infers. What is left is metadata (Shape) and Concat: no
integer arithmetic feeds a shape. A target that cannot be rebuilt that way is kept as
exported. The values are the same by construction (the same symbolic expressions),
and every parity test runs on the rewritten graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops whose output depends on the input's shape only.
_METADATA = {"Shape"}
# Integer arithmetic that must not feed a shape input.
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Mod", "Floor", "Ceil", "Neg", "Abs", "Max", "Min"}


def _dims(value: onnx.ValueInfoProto) -> list[str | int] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[str | int] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            return None
    return out


def _constant(graph: onnx.GraphProto, name: str):
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


class _Builder:
    """Adds the Shape/Concat nodes and constants of one rewritten graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"pe_shape_{stem}_{self.count}"

    def const(self, values: list[int]) -> str:
        name = self.name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def piece(self, source: tuple[str, int], new: list[onnx.NodeProto]) -> str:
        tensor, axis = source
        out = self.name("dim")
        new.append(helper.make_node("Shape", [tensor], [out], name=out, start=axis, end=axis + 1))
        return out


def _arithmetic_source(name: str, producer: dict, initializers: set) -> onnx.NodeProto | None:
    """The first integer-arithmetic node that leads to ``name`` (a walk up the graph
    that stops at Shape, whose output is metadata), or None."""
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n in seen or n in initializers or n not in producer:
            continue
        seen.add(n)
        node = producer[n]
        if node.op_type in _METADATA:
            continue
        if node.op_type in ARITHMETIC:
            return node
        stack.extend(node.input)
    return None


def static_shape_inputs(model: onnx.ModelProto) -> int:
    """In place: rebuild computed Reshape targets and Slice ends from Shape slices and
    constants (module docstring). Returns how many inputs were rebuilt."""
    g = model.graph
    info = {v.name: _dims(v) for v in (*g.input, *g.value_info, *g.output)}
    initializers = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    b = _Builder(g)
    known: dict[str | int, tuple[str, int]] = {}  # a symbolic dim -> (tensor, axis) holding it

    def learn(name: str) -> None:
        for axis, d in enumerate(info.get(name) or ()):
            if isinstance(d, str) and d not in known:
                known[d] = (name, axis)

    def computed(name: str) -> bool:
        return _arithmetic_source(name, producer, initializers) is not None

    for v in g.input:
        learn(v.name)
    out_nodes: list[onnx.NodeProto] = []
    rebuilt = 0
    for node in g.node:
        new: list[onnx.NodeProto] = []
        if node.op_type == "Reshape" and len(node.input) > 1 and computed(node.input[1]):
            target = _reshape_target(node, info, known, b, new)
            if target is not None:
                node.input[1] = target
                rebuilt += 1
            else:
                new = []
        elif node.op_type == "Slice" and len(node.input) > 2 and computed(node.input[2]):
            ends = _slice_ends(node, g, info, known, b, new)
            if ends is not None:
                node.input[2] = ends
                rebuilt += 1
            else:
                new = []
        out_nodes.extend(new)
        out_nodes.append(node)
        for o in node.output:
            learn(o)
    del g.node[:]
    g.node.extend(out_nodes)
    _remove_dead(g)
    return rebuilt


def _concat(pieces: list[str], b: _Builder, new: list[onnx.NodeProto]) -> str:
    out = b.name("target")
    new.append(helper.make_node("Concat", pieces, [out], name=out, axis=0))
    return out


def _reshape_target(node, info, known, b: _Builder, new) -> str | None:
    src, dst = info.get(node.input[0]), info.get(node.output[0])
    if dst is None:
        return None
    pieces: list[str] = []
    infer = 0
    for i, d in enumerate(dst):
        if isinstance(d, int):
            pieces.append(b.const([d]))
        elif d in known:
            pieces.append(b.piece(known[d], new))
        elif src is not None and i < len(src) and src[i] == d:
            # Reshape's 0 ("the input's dimension i") where no tensor seen so far has d:
            # with a -1 beside it, ONNX Runtime's shape inference refuses it.
            pieces.append(b.piece((node.input[0], i), new))
        else:
            infer += 1
            pieces.append(b.const([-1]))
    if infer > 1 or (infer == 1 and src is None):
        return None
    return _concat(pieces, b, new)


def _slice_ends(node, graph, info, known, b: _Builder, new) -> str | None:
    """Ends of a Slice from 0 with step 1: the output's own dimensions on those axes."""
    dst = info.get(node.output[0])
    starts = _constant(graph, node.input[1])
    axes = _constant(graph, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = _constant(graph, node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if dst is None or starts is None or (starts != 0).any():
        return None
    if steps is not None and (steps != 1).any():
        return None
    if axes is None:
        axes = list(range(len(starts)))
    pieces = []
    for a in axes:
        d = dst[int(a)]
        if isinstance(d, int):
            pieces.append(b.const([d]))
        elif d in known:
            pieces.append(b.piece(known[d], new))
        else:
            return None
    return _concat(pieces, b, new)


def _remove_dead(g: onnx.GraphProto) -> None:
    """Drop the nodes and initializers nothing reads any more."""
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    names = {o for n in keep for o in n.output} | {i.name for i in g.input}
    vis = [v for v in g.value_info if v.name in names]
    del g.value_info[:]
    g.value_info.extend(vis)


# How a shape value travels: the inputs through which an op passes it on.
_CARRY = {"Gather": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Reshape": (0,), "Slice": (0,),
          "Identity": (0,), "Concat": None, **{op: None for op in ARITHMETIC}}


def shape_arithmetic(model: onnx.ModelProto) -> list[str]:
    """Integer arithmetic on shape values: nodes of ARITHMETIC that read a value
    derived from a Shape without a Cast in between (a Cast to float starts ordinary
    float math, such as the Gram's 1/sqrt(C·H·W) factor). What the CUDA provider got
    wrong; the exported graphs have none (tests)."""
    shaped: set[str] = set()
    found = []
    for node in model.graph.node:
        if node.op_type == "Shape":
            shaped.update(node.output)
            continue
        carry = _CARRY.get(node.op_type, ())
        ins = node.input if carry is None else [node.input[i] for i in carry if i < len(node.input)]
        if any(i in shaped for i in ins):
            if node.op_type in ARITHMETIC:
                found.append(f"{node.op_type} {node.name}")
            shaped.update(node.output)
    return found


__all__ = ["static_shape_inputs", "shape_arithmetic", "ARITHMETIC"]
