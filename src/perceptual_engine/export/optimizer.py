"""The ONNX optimizer every export runs: onnxscript's default, with exact no-op rules.

``torch.onnx.export(optimize=True)`` runs ``onnxscript.optimizer.optimize``, whose rewrite
rules include x + 0 -> x, x - 0 -> x, x * 1 -> x and x / 1 -> x
(``onnxscript/rewriter/rules/common/_no_op.py``). Their constant patterns match a scalar
within ``math.isclose(c, 0 or 1, rel_tol=1e-5, abs_tol=1e-8)``: any |c| <= 1e-8 counts as 0.
So LPIPS' ``sqrt(Σ f²) + 1e-10`` lost its Add, and a dead feature vector gave 0/0 = NaN
where the lpips package gives 0. Every small constant a graph adds or subtracts (a
stabilizer like 1e-10 or 1e-12) went the same way; 1e-6 and larger were kept.

``optimize`` runs the same passes as ``onnxscript.optimizer.optimize_ir`` with the same
defaults, the four tolerant rules replaced by ones that match exactly 0 or 1. Nothing a
graph builder does is needed for its constants to survive.
"""
from __future__ import annotations

import onnx_ir as ir


def rewrite_rules() -> tuple:
    """onnxscript's default rewrite rules, the no-op rules matching exact constants only."""
    from onnxscript import rewriter
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.rules.common import _no_op

    def exact(value: float):
        return pattern.Constant(value, rel_tol=0.0, abs_tol=0.0)

    def add_0(op, x):
        return op.Add(x, exact(0.0))

    def sub_0(op, x):
        return op.Sub(x, exact(0.0))

    def mul_by_1(op, x):
        return op.Mul(x, exact(1.0))

    def div_by_1(op, x):
        return op.Div(x, exact(1.0))

    def identity(op, x, **_):
        return op.Identity(x)

    exact_rules = (*pattern.RewriteRule(add_0, identity).commute(), pattern.RewriteRule(sub_0, identity),
                   *pattern.RewriteRule(mul_by_1, identity).commute(), pattern.RewriteRule(div_by_1, identity))
    keep = {id(_no_op.dropout_zero_rule), id(_no_op.dropout_inference_rule)}
    tolerant = {id(r) for r in _no_op.rules.rules if id(r) not in keep}
    if len(tolerant) != 6:  # mul_by_1 x2, add_0 x2, sub_0, div_by_1 (onnxscript 0.7)
        raise RuntimeError(f"onnxscript's no-op rules changed ({len(tolerant)} found, 6 expected); "
                           "perceptual_engine.export.optimizer needs updating")
    out, placed = [], False
    for rule in rewriter._DEFAULT_REWRITE_RULES:
        if id(rule) not in tolerant:
            out.append(rule)
        elif not placed:  # the exact rules where the tolerant ones were: order is kept
            out.extend(exact_rules)
            placed = True
    return tuple(out)


def optimize(model: ir.Model) -> None:
    """In place: ``onnxscript.optimizer.optimize_ir(model)`` with ``rewrite_rules()``."""
    import onnx_ir.passes.common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    passes = [
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=lambda node: None,
                ),
                rewriter.RewritePass(rewrite_rules()),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    ]
    result = ir.passes.Sequential(*passes)(model)
    assert result.model is model  # every pass works in place
    sums_of_squares(model.graph)


def sums_of_squares(graph: ir.Graph) -> int:
    """In place: ReduceSum(Mul(a, a)) -> ReduceSumSquare(a) where the square has no other
    use (torch has no sum-of-squares op to export): one pass over a, no squared copy.
    Returns how many were rewritten.

    Only where the sum is short or its input was float16: ONNX Runtime's CPU
    ReduceSumSquare adds one value at a time (1e-3 off over 1.6M values, where its
    ReduceSum, which adds in blocks, is 5e-5 off), so a long float32 sum keeps ReduceSum.
    Short: over axis 1 of a 4-D tensor with keepdims (a channel norm, at most a few
    hundred values). float16: a Cast from float16 feeds it, and the float16 tier (1e-2)
    absorbs that rounding."""
    done = 0
    for node in list(graph):
        if node.op_type != "ReduceSum" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        square = node.inputs[0].producer() if node.inputs[0] is not None else None
        if (square is None or square.op_type != "Mul" or square.domain not in ("", "ai.onnx")
                or square.inputs[0] is not square.inputs[1] or len(square.outputs[0].uses()) != 1
                or square.outputs[0].is_graph_output()):
            continue
        if not (_over_channels(node, square.inputs[0]) or _from_float16(square.inputs[0])):
            continue
        new = ir.Node("", "ReduceSumSquare", inputs=[square.inputs[0], *node.inputs[1:]],
                      attributes=list(node.attributes.values()), name=f"{node.name}_sum_square_{done}")
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [square, node], [new],
                                                [node.outputs[0]], [new.outputs[0]])
        done += 1
    return done


def _over_channels(node: ir.Node, squared: ir.Value) -> bool:
    """A ReduceSum over axis 1 of a 4-D tensor (``squared``, the value squared), keeping the axis."""
    keep = node.attributes.get("keepdims")
    axes = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    rank = squared.shape.rank() if squared.shape is not None else None
    return ((keep is None or keep.as_int() == 1) and axes is not None
            and axes.numpy().reshape(-1).tolist() in ([1], [-3]) and rank == 4)


def _from_float16(value: ir.Value) -> bool:
    producer = value.producer()
    if producer is None or producer.op_type != "Cast" or not producer.inputs:
        return False
    source = producer.inputs[0].type
    return source is not None and source.dtype == ir.DataType.FLOAT16
