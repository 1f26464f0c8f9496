"""No integer arithmetic on shapes in any exported graph (export/shapes.py).

On the CUDA provider (onnxruntime-gpu 1.31.1, H200) int64 Mul/Div results that fed
Reshape targets came out wrong ("requested shape {4,64,52277600}"). Every graph kind,
with and without its gradient, must now take its shapes from Shape slices, constants
and Concat only. The values are checked by the parity tests, which run on these graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import SHAPES_LOSS as LOSS, SHAPES_SPEC as SPEC
from perceptual_engine.export import shapes

@pytest.mark.parametrize("name", ["features", "distance", "distance-grad", "style", "target-grad"])
def test_vgg_graphs_have_no_shape_arithmetic(vgg_graphs, name):
    assert shapes.shape_arithmetic(onnx.load(vgg_graphs[name])) == []


def test_lpips_and_dists_graphs_have_no_shape_arithmetic(lpips_models, dists_models):
    paths = [lpips_models["fp32"][0], lpips_models["fp16"][0], dists_models["fp32"][0], dists_models["fp16"]]
    for path in paths:  # LPIPS with grad.x and the spatial map, DISTS with grad.x, both float16
        assert shapes.shape_arithmetic(onnx.load(path)) == [], path


def test_the_gradient_through_a_pool_is_right_on_odd_sides(vgg_graphs, rel_err):
    # The pool VJP's crops came from 2·Ho and its pads from H − 2·Ho; now from constant
    # slices and x's own sides. Against autograd, on sides of both parities.
    import torch

    from perceptual_engine.reference import TorchPerceptualLoss

    sess = ort.InferenceSession(vgg_graphs["distance-grad"], providers=["CPUExecutionProvider"])
    ref = TorchPerceptualLoss(SPEC, LOSS)
    rng = np.random.default_rng(5)
    for h, w in ((33, 46), (32, 47), (35, 35)):
        x, y = (rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32) for _ in range(2))
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "y": y})))
        xt = torch.from_numpy(x).requires_grad_(True)
        ref(xt, torch.from_numpy(y))["total"].sum().backward()
        assert got["grad.x"].shape == x.shape
        assert rel_err(got["grad.x"], xt.grad.numpy()) <= 1e-4, (h, w)


def _toy() -> onnx.ModelProto:
    """Reshape (N, C, H, W) -> (N, C, H·W) with H·W computed, as torch.export writes it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
             helper.make_node("Gather", ["s", "i3"], ["w"], axis=0),
             helper.make_node("Mul", ["h", "w"], ["hw"]),
             helper.make_node("Concat", ["n", "c", "hw"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["y"])]
    inits = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in
             (("i0", 0), ("i2", 2), ("i3", 3), ("c", 4))]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, "height", "width"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, "height*width"])
    g = helper.make_graph(nodes, "toy", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_the_rewrite_reads_shapes_and_keeps_the_values():
    m = _toy()
    assert [f.split()[0] for f in shapes.shape_arithmetic(m)] == ["Mul"]
    assert shapes.static_shape_inputs(m) == 1
    assert shapes.shape_arithmetic(m) == []
    assert not any(n.op_type == "Mul" for n in m.graph.node)  # the dead arithmetic is gone
    onnx.checker.check_model(m)
    x = np.random.default_rng(0).uniform(size=(3, 4, 5, 7)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x.reshape(3, 4, 35))
