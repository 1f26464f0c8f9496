"""Per-image embeddings in which an lpips or distance model's terms are squared L2 distances.

The model file computes d(x, y); a distance matrix needs each image's embedding
once. Rather than a second exported graph, the x branch of the user's own file is
cut out at load: the backbone is walked from input ``x`` through its Conv / Relu /
pool nodes (a SqueezeNet Fire block: squeeze Conv, Relu, two expand Conv + Relu, Concat),
matched one by one against the layer table of the model's trunk, so a file of another layout
is refused, not misread), the tapped tensors become the outputs, every node they do
not depend on is dropped, and a ``Concat(x, y)`` that feeds both images as one batch
becomes ``Identity(x)``. The file's integrity digests are checked on the very bytes
that are cut (``export.integrity.check``). The embedding formulas run on the taps:

- LPIPS tap l, features f (C, h, w): sqrt(w_l,c) · f_c / (‖f‖_c + 1e-10) / sqrt(h·w);
  the linear weights w_l are read from the file's own head and checked against the
  SHA-256 its metadata records;
- content layer l: f / sqrt(C·h·w);
- style layer l: Gram(f) / C (the Gram with the model's norm), flattened.

Then term t of (x_i, y_j) is |e_t(x_i) − e_t(y_j)|², and total = Σ_t weight_t · term_t.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .. import layers as _layers
from ..errors import ModelError

_BODY = {"conv": ("Conv",), "relu": ("Relu",), "pool": ("MaxPool", "AveragePool"), "fire": ("Conv",)}
_BEFORE = ("Concat", "Mul", "Add", "Sub", "Div", "Cast", "Identity")  # input normalization


def _refuse(path: str, what: str) -> ModelError:
    return ModelError(f"{path!r}: {what}; distance matrices need a graph exported by this package "
                      "(perceptual-engine export --graph lpips or --graph distance). Re-export it.")


def tap_tensors(graph: Any, arch: str, taps: tuple[str, ...], path: str) -> tuple[dict[str, str], Any]:
    """{layer: tensor name} of x's features at ``taps``, and the Concat(x, y) node (or None)."""
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    table = _layers.table(arch)
    last = max(table.index(_layers.resolve(arch, t)) for t in taps)
    tensor, pos, concat, found = "x", 0, None, {}
    body_ops = {op for ops in _BODY.values() for op in ops}
    while pos <= last:
        nodes = [n for n in consumers[tensor] if n.op_type in body_ops]
        if not nodes and pos == 0:  # still in the input normalization
            before = [n for n in consumers[tensor] if n.op_type in _BEFORE]
            if len(before) != 1:
                raise _refuse(path, f"the input {tensor!r} feeds {len(before)} normalization nodes")
            if before[0].op_type == "Concat":
                if list(before[0].input)[:1] != ["x"] or concat is not None:
                    raise _refuse(path, "its input concatenation is not (x, y)")
                concat = before[0]
            tensor = before[0].output[0]
            continue
        want = table[pos]
        if len(nodes) != 1 or nodes[0].op_type not in _BODY[want.kind]:
            got = [n.op_type for n in nodes]
            raise _refuse(path, f"layer {want.name} should be one {'/'.join(_BODY[want.kind])} node "
                                f"after {tensor!r}, found {got}")
        tensor = _fire_output(consumers, nodes[0], path, want.name) if want.kind == "fire" else nodes[0].output[0]
        if want.name in taps:
            found[want.name] = tensor
        pos += 1
    return found, concat


def _fire_output(consumers: dict, squeeze: Any, path: str, name: str) -> str:
    """The Concat output of a Fire block whose squeeze Conv is ``squeeze``."""
    def only(tensor: str, op: str, count: int = 1) -> list:
        nodes = [n for n in consumers[tensor] if n.op_type == op]
        if len(nodes) != count:
            raise _refuse(path, f"the Fire block {name} should feed {count} {op} node(s) from {tensor!r}, "
                                f"found {[n.op_type for n in consumers[tensor]]}")
        return nodes

    act = only(squeeze.output[0], "Relu")[0]
    outs = [only(conv.output[0], "Relu")[0].output[0] for conv in only(act.output[0], "Conv", 2)]
    cat = only(outs[0], "Concat")[0]
    if sorted(cat.input) != sorted(outs):
        raise _refuse(path, f"the Fire block {name} does not end in one Concat of its two expand branches")
    return cat.output[0]


def x_branch(model: Any, outputs: dict[str, str], concat: Any) -> Any:
    """A ModelProto computing only ``outputs`` ({layer: tensor}) from input x."""
    import onnx
    from onnx import helper

    g = model.graph
    nodes = [helper.make_node("Identity", ["x"], list(concat.output), name="x_only")
             if n is concat else n for n in g.node]
    needed, keep = set(outputs.values()), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    inputs = [i for i in g.input if i.name in needed]
    if [i.name for i in inputs] != ["x"]:
        raise ModelError(f"the x branch of the model needs inputs {[i.name for i in inputs]}, not only x.")
    probe = helper.make_model(helper.make_graph(keep, "x_branch", inputs, [], []),
                              opset_imports=model.opset_import, ir_version=model.ir_version)
    # Types of the taps (float16 networks keep float16 activations) from type inference
    # on the graph without its weights (fast); fall back to float32.
    for init in g.initializer:
        if init.name in needed:
            probe.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = {v.name: v.type.tensor_type.elem_type
                for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    outs = [helper.make_tensor_value_info(t, inferred.get(t, onnx.TensorProto.FLOAT), None)
            for t in outputs.values()]
    inits = [i for i in g.initializer if i.name in needed]
    graph = helper.make_graph(keep, "x_branch", inputs, outs, inits)
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def embed_taps(feats: dict[str, np.ndarray], terms: dict[str, tuple[str, str]],
               lin: dict[str, np.ndarray], gram_norm: str,
               head_embed: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{term: (n, D_t) float32} from the taps {layer: (n, C, h, w)}; ``terms`` maps a
    term to (kind, layer), kind "head" (a learned head's term: ``head_embed(f, lin[layer])``,
    from the head's module) | "content" | "style"."""
    out = {}
    for term, (kind, layer) in terms.items():
        f = np.asarray(feats[layer], dtype=np.float32)
        n, c, h, w = f.shape
        if kind == "head":
            e = head_embed(f, lin[layer])  # type: ignore[misc]
        elif kind == "content":
            e = f * np.float32(1.0 / np.sqrt(c * h * w))
        else:
            div = {"chw": c * h * w, "hw": h * w, "none": 1}[gram_norm]
            flat = f.reshape(n, c, h * w) * np.float32(1.0 / np.sqrt(div))
            e = np.matmul(flat, flat.transpose(0, 2, 1)) * np.float32(1.0 / c)
        out[term] = np.ascontiguousarray(e.reshape(n, -1), dtype=np.float32)
    return out


def term_dims(terms: dict[str, tuple[str, str]], arch: str, height: int, width: int) -> dict[str, int]:
    """D_t of every term for images of height x width."""
    dims = {}
    for term, (kind, layer) in terms.items():
        info = _layers.resolve(arch, layer)
        if kind == "style":
            dims[term] = info.channels ** 2
        else:
            dims[term] = info.channels * info.size(height) * info.size(width)
    return dims
