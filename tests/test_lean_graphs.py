"""The lean exported graphs: joined-batch terms, float16 Grams and LPIPS norms without
float32 copies, the sum-of-squares rewrite, the glue-traffic limits (scripts/graph_traffic.py),
static-shape and float16-output exports."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
import torch

from perceptual_engine import FeatureSpec, LossConfig, PerceptualError, export_onnx, losses
from perceptual_engine import lpips as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import graph_traffic  # noqa: E402

GB = 1e9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _joined(seed: int = 0) -> dict[str, torch.Tensor]:
    """Features of a joined batch (3 x's, then 3 y's), odd sizes, activations up to ~300."""
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 8, 13, 11, generator=g) * 50,
            "b": torch.relu(torch.randn(6, 16, 7, 5, generator=g)) * 120}


@pytest.mark.parametrize("gram", ["chw", "hw", "none"])
def test_pair_terms_match_the_split_halves(gram):
    """losses.pair_terms (the graph's joined form) against distance_terms on x's and y's
    halves: float32 to 1e-6; float16 features within the float16 tier (2e-3 measured ~5e-4)."""
    f = _joined()
    loss = LossConfig(content={"a": 1.0}, style={"a": 1.0, "b": 0.5}, gram=gram)
    ref = losses.distance_terms({k: v[:3] for k, v in f.items()}, {k: v[3:] for k, v in f.items()}, loss)
    got = losses.pair_terms(f, 3, loss)
    half = losses.pair_terms({k: v.half() for k, v in f.items()}, 3, loss)
    for k in ref:
        assert got[k].dtype == half[k].dtype == torch.float32
        assert _rel(got[k], ref[k]) <= 1e-6, k
        assert _rel(half[k], ref[k]) <= 2e-3, k


def test_gram_fast_holds_large_activations():
    """float16 features up to 4000 (their squares overflow float16 16000-fold): the
    pre-scaled float16 Gram is finite and within 2e-3 of float32's, for both norms."""
    g = torch.Generator().manual_seed(1)
    f = torch.rand(2, 4, 9, 7, generator=g) * 4000
    for norm in ("chw", "hw"):
        got = losses.gram_fast(f.half(), norm)
        assert torch.isfinite(got).all()
        assert _rel(got, losses.gram(f.half().float(), norm)) <= 2e-3


def test_lpips_head_pair_matches_the_head():
    """lpips.head_pair (joined batch, 1x1 conv) against lpips.head on the halves: float32
    to 1e-6 and float16 to 5e-3, a dead (all-zero) feature vector included (finite, 0)."""
    g = torch.Generator().manual_seed(2)
    chans = [64, 128, 256, 512, 512]
    f = {n: torch.relu(torch.randn(4, c, 9 - i, 11 - i, generator=g)) * 30 for i, (n, c) in enumerate(zip(L.LAYERS, chans))}
    f[L.LAYERS[0]][:, :, 0, 0] = 0  # every channel of one pixel, x's and y's
    lin = L.LinearWeights(tuple(torch.rand(1, c, 1, 1, generator=g) for c in chans), "test", "0" * 64)
    ref = L.head({k: v[:2] for k, v in f.items()}, {k: v[2:] for k, v in f.items()}, lin, size=(17, 19))
    got = L.head_pair(f, 2, lin, size=(17, 19))
    half = L.head_pair({k: v.half() for k, v in f.items()}, 2, lin)
    for k in ref:
        assert torch.isfinite(got[k]).all()
        assert _rel(got[k], ref[k]) <= 1e-6, k
        if k != "spatial":
            assert _rel(half[k], ref[k]) <= 5e-3, k


def test_sums_of_squares_become_reduce_sum_square():
    """ReduceSum(Mul(a, a)) -> ReduceSumSquare(a) over channels (axis 1 of a 4-D tensor,
    kept) or on a float16 input's cast; a long float32 sum is left alone (ONNX Runtime's
    CPU ReduceSumSquare adds one value at a time), and so are a product of two tensors and
    a square with another use. The rewritten graph computes the same."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from perceptual_engine.export import optimizer

    inits = [helper.make_tensor("c", TensorProto.INT64, [1], [1]), helper.make_tensor("hw", TensorProto.INT64, [2], [2, 3])]
    nodes = [helper.make_node("Mul", ["a", "a"], ["sq"]), helper.make_node("ReduceSum", ["sq", "c"], ["s"]),  # yes
             helper.make_node("Mul", ["a", "a"], ["sq2"]), helper.make_node("ReduceSum", ["sq2", "hw"], ["s2"]),  # long
             helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["h32", "h32"], ["hh"]), helper.make_node("ReduceSum", ["hh", "hw"], ["s3"]),  # yes
             helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("ReduceSum", ["ab", "c"], ["t"]),
             helper.make_node("Mul", ["b", "b"], ["bb"]), helper.make_node("ReduceSum", ["bb", "c"], ["u"])]
    vi = lambda n, s, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("a", [2, 3, 4, 5]), vi("b", [2, 3, 4, 5]), vi("h", [2, 3, 4, 5], TensorProto.FLOAT16)],
                              [vi("s", None), vi("s2", None), vi("s3", None), vi("t", None), vi("u", None),
                               vi("bb", None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    assert optimizer.sums_of_squares(model.graph) == 2
    out = ir.serde.serialize_model(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("ReduceSumSquare") == 2 and ops.count("Mul") == 3, ops
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 2, 3, 4, 5)).astype(np.float32)
    feeds = {"a": a, "b": b, "h": a.astype(np.float16)}
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for x, y in zip(run(out), run(proto)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# -- glue traffic: the limits of scripts/graph_traffic.py's figures, batch 8, 224² --------------
# Exact configurations where the session's models have them (features: VGG19 to relu4_4;
# LPIPS and DISTS on VGG16); the float16 distance model's loss differs from the script's
# (content relu2_2 + relu4_4, style on relu1_2, relu3_4, relu4_4) and is held to the same limit.

def test_glue_traffic_features_distance(fp16_models):
    feats = graph_traffic.measure(fp16_models["features"][0])
    dist = graph_traffic.measure(fp16_models["distance"][0])
    assert feats["unknown_shapes"] == dist["unknown_shapes"] == 0
    assert feats["glue_bytes"] <= 0.8 * GB, feats
    assert dist["glue_bytes"] <= 2.5 * GB, dist
    # No float32 copy of a tap: the only Casts are of the input and of small results.
    assert dist["by_op"].get("Cast", 0) <= 0.15 * GB, dist


def test_glue_traffic_lpips(lpips_models):
    r = graph_traffic.measure(lpips_models["fp16"][0])
    assert r["unknown_shapes"] == 0 and r["glue_bytes"] <= 3.5 * GB, r


# -- static shapes and float16 outputs ---------------------------------------------------------
SMALL = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2"), weights="random", seed=4)
SMALL_LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0})


@pytest.fixture(scope="module")
def static_distance(tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / "static.onnx"
    result = export_onnx(SMALL, path, graph="distance", loss=SMALL_LOSS, dtype="float16", static_shape=(3, 37, 45))
    return str(path), result


def test_static_shape_export(static_distance, distance_model):
    """Verified at its shape, every input dim a constant, no shape arithmetic left (no
    Shape node), and the Engine gives the dynamic model's numbers at that shape."""
    from perceptual_engine import Engine

    path, result = static_distance
    assert result.max_rel_error <= 2e-2
    model = onnx.load(path)
    for value in model.graph.input:
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [3, 3, 37, 45]
    assert not [n for n in model.graph.node if n.op_type == "Shape"]
    engine = Engine(path, device="cpu")
    assert engine.info.static_shape == (3, 37, 45)
    rng = np.random.default_rng(5)
    x, y = (rng.uniform(0, 1, (3, 3, 37, 45)).astype(np.float32) for _ in range(2))
    out = engine.distance(x, y)
    from perceptual_engine import TorchPerceptualLoss

    ref = TorchPerceptualLoss(SMALL, SMALL_LOSS)(torch.from_numpy(x), torch.from_numpy(y))
    for k, v in ref.items():
        assert np.abs(out[k] - v.detach().numpy()).max() <= 2e-2 * float(v.abs().max()), k


@pytest.mark.parametrize("shape", [(2, 3, 37, 45), (3, 3, 37, 47)])
def test_static_shape_refuses_another_shape(static_distance, shape):
    from perceptual_engine import Engine

    engine = Engine(static_distance[0], device="cpu")
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    with pytest.raises(PerceptualError) as exc:
        engine.distance(x, x.copy())
    msg = str(exc.value)
    assert "\n" not in msg and str(shape) in msg and "(3, 3, 37, 45)" in msg, msg


@pytest.mark.parametrize("kwargs, words", [
    (dict(graph="style", loss=LossConfig(style={"relu1_2": 1.0}), static_shape=(1, 40, 40)), "style graph"),
    (dict(graph="features", static_shape=(1, 40)), "three positive integers"),
    (dict(graph="features", static_shape=(0, 40, 40)), "three positive integers"),
    (dict(graph="features", static_shape=(1, 40, 40.5)), "three positive integers"),
    (dict(graph="features", fp16_outputs=True), "dtype='float16'"),
    (dict(graph="distance", loss=SMALL_LOSS, dtype="float16", fp16_outputs=True), "graph='features'"),
])
def test_export_options_refused(tmp_path, kwargs, words):
    with pytest.raises(PerceptualError) as exc:
        export_onnx(SMALL, tmp_path / "m.onnx", **kwargs)
    assert words in str(exc.value) and "\n" not in str(exc.value)
    assert not os.listdir(tmp_path)


def test_fp16_outputs(tmp_path):
    """The taps leave a float16 features graph as float16 (no output Cast), within the
    float16 tier of the float32 reference, through the Engine as float16 arrays."""
    from perceptual_engine import Engine, TorchFeatures

    path = tmp_path / "f16.onnx"
    result = export_onnx(SMALL, path, graph="features", dtype="float16", fp16_outputs=True)
    model = onnx.load(path)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers[o.name] != "Cast" for o in model.graph.output)
    assert result.max_rel_error <= 2e-2
    engine = Engine(str(path), device="cpu")
    assert engine.info.output_dtype == "float16"
    x = np.random.default_rng(1).uniform(0, 1, (2, 3, 35, 41)).astype(np.float32)
    got = engine.features(x)
    ref = TorchFeatures(SMALL)(torch.from_numpy(x))
    for k, v in ref.items():
        assert got[k].dtype == np.float16
        assert np.abs(got[k].astype(np.float32) - v.numpy()).max() <= 2e-2 * float(v.abs().max()), k


def test_cli_export_options(tmp_path, capsys):
    from perceptual_engine.cli.main import main

    out = tmp_path / "m.onnx"
    rc = main(["export", "--weights", "random", "--layers", "relu1_2", "--static-shape", "2x40", "-o", str(out)])
    assert rc == 2 and "BATCHxHEIGHTxWIDTH" in capsys.readouterr().err
    rc = main(["export", "--weights", "random", "--layers", "relu1_2", "--fp16-outputs", "-o", str(out)])
    assert rc == 2 and "--fp16-outputs needs --graph features --dtype float16" in capsys.readouterr().err
    rc = main(["export", "--weights", "random", "--layers", "relu1_2", "--dtype", "float16", "--fp16-outputs",
               "--static-shape", "2x33x35", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "float16 outputs" in text and "(2, 3, 33, 35), static" in text, text
