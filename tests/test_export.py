"""export_onnx: graphs vs the PyTorch reference on ONNX Runtime CPU, metadata, atomic writes.

Parity measure: max |ort - ref| / max |ref| per output, at most 1e-4 for float32
and 2e-2 for float16 (the export's own TOLERANCE).
"""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch

import perceptual_engine
from perceptual_engine import Engine, FeatureSpec, LossConfig, TorchFeatures, export_onnx, losses
from perceptual_engine.errors import ConfigError, ExportError
from perceptual_engine.export import exporter
from perceptual_engine.export.verify import OutputError, compare
from perceptual_engine.weights import load_weights

F32_TOL = 1e-4
F16_TOL = 2e-2
SIZES = [(1, 37, 53), (3, 64, 64), (3, 97, 131)]


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _run(sess, feeds):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _ref_features(spec, x, weights=None):
    with torch.no_grad():
        return {k: v.numpy() for k, v in TorchFeatures(spec, weights=weights)(torch.from_numpy(x)).items()}


def _ref_distance(spec, loss, x, y, weights=None):
    m = TorchFeatures(spec, weights=weights)
    with torch.no_grad():
        fx, fy = m(torch.from_numpy(x)), m(torch.from_numpy(y))
        return {k: v.numpy() for k, v in losses.distance_terms(fx, fy, loss).items()}


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, h, w", SIZES)
def test_features_graph_matches_reference(features_model, make_images, rel_err, n, h, w):
    path, spec, _ = features_model
    x = make_images((n, 3, h, w), seed=h)
    expected = _ref_features(spec, x)
    got = _run(_session(path), {"x": x})
    assert list(got) == list(spec.layers)
    for name in spec.layers:
        assert got[name].dtype == np.float32
        assert rel_err(got[name], expected[name]) <= F32_TOL, name
    # conv taps keep their negative (pre-activation) values through the export.
    assert got["conv3_1"].min() < 0 and got["relu3_1"].min() >= 0


@pytest.mark.parametrize("n, h, w", SIZES)
def test_features_graph_via_engine(features_model, make_images, rel_err, n, h, w):
    path, spec, _ = features_model
    x = make_images((n, 3, h, w), seed=h + 1)
    got = Engine(path, device="cpu").features(x)
    expected = _ref_features(spec, x)
    for name in spec.layers:
        assert rel_err(got[name], expected[name]) <= F32_TOL, name


@pytest.mark.parametrize("n, h, w", SIZES)
def test_distance_graph_matches_reference(distance_model, make_images, rel_err, n, h, w):
    path, spec, loss, _ = distance_model
    x, y = make_images((n, 3, h, w), seed=1), make_images((n, 3, h, w), seed=2)
    expected = _ref_distance(spec, loss, x, y)
    got = _run(_session(path), {"x": x, "y": y})
    assert list(got) == ["content.relu2_2", "content.relu3_1", "style.relu1_2", "style.relu3_1", "total"]
    for k, v in got.items():
        assert v.shape == (n,) and v.dtype == np.float32, k
        assert rel_err(v, expected[k]) <= F32_TOL, k
    via_engine = Engine(path, device="cpu").distance(x, y)
    for k in expected:
        assert rel_err(via_engine[k], expected[k]) <= F32_TOL, k


def test_distance_of_an_image_to_itself_is_zero(distance_model, make_images):
    path, *_ = distance_model
    x = make_images((2, 3, 37, 53), seed=3)
    out = Engine(path, device="cpu").distance(x, x.copy())
    for k, v in out.items():
        np.testing.assert_allclose(v, 0.0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("gram", ["hw"])  # "chw": distance_model; "none": fp16_models
def test_distance_graph_other_gram_norms(gram, tmp_path, make_images, rel_err):
    spec = FeatureSpec(layers=("relu1_2", "relu2_1"), weights="random", seed=21)
    loss = LossConfig(content={"relu2_1": 1.0}, style={"relu1_2": 1.0, "relu2_1": 0.5}, gram=gram)
    path = str(tmp_path / "d.onnx")
    result = export_onnx(spec, path, graph="distance", loss=loss)
    assert result.outputs == ("content.relu2_1", "style.relu1_2", "style.relu2_1", "total")
    x, y = make_images((3, 3, 37, 53), seed=4), make_images((3, 3, 37, 53), seed=5)
    expected = _ref_distance(spec, loss, x, y)
    got = _run(_session(path), {"x": x, "y": y})
    for k in expected:
        assert rel_err(got[k], expected[k]) <= F32_TOL, k


def test_distance_graph_default_loss(tmp_path):
    spec = FeatureSpec(layers=("relu1_1", "relu1_2"), weights="random", seed=21)
    result = export_onnx(spec, tmp_path / "d.onnx", graph="distance")
    assert result.outputs == ("content.relu1_1", "content.relu1_2", "total")
    meta = _props(tmp_path / "d.onnx")
    assert json.loads(meta["perceptual_engine.loss"]) == LossConfig.default_for(spec).to_dict()


@pytest.mark.parametrize("n, h, w", [(1, 37, 53), (3, 64, 64)])
def test_vgg16_avg_pool_minus_one_range(vgg16_model, make_images, rel_err, n, h, w):
    path, spec, _ = vgg16_model
    x = make_images((n, 3, h, w), seed=7, lo=-1.0, hi=1.0)
    expected = _ref_features(spec, x)
    got = Engine(path, device="cpu").features(x)
    for name in spec.layers:
        assert rel_err(got[name], expected[name]) <= F32_TOL, name


def test_style_graph_matches_reference(style_model, make_images, rel_err):
    path, spec, loss, result = style_model
    assert result.inputs == ("x", "target.gram.relu1_2", "target.gram.relu3_1")
    assert result.outputs == ("style.relu1_2", "style.relu3_1", "total", "gram.relu1_2", "gram.relu3_1")
    assert set(result.errors) == set(result.outputs)
    m = TorchFeatures(spec)
    x, t = make_images((3, 3, 37, 53), seed=14), make_images((1, 3, 41, 45), seed=15)
    with torch.no_grad():
        gt = losses.style_grams(m(torch.from_numpy(t)), loss)
        gx = losses.style_grams(m(torch.from_numpy(x)), loss)
        expected = losses.style_terms(gx, gt, loss)
    expected = {k: v.numpy() for k, v in expected.items()}
    expected.update({f"gram.{k}": v.numpy() for k, v in gx.items()})
    feeds = {"x": x, **{f"target.gram.{k}": v.numpy() for k, v in gt.items()}}
    got = _run(_session(path), feeds)
    assert list(got) == list(result.outputs)
    for k in expected:
        assert rel_err(got[k], expected[k]) <= F32_TOL, k


def test_style_graph_needs_a_style_only_loss(tmp_path):
    spec = FeatureSpec(layers=("relu1_2",), weights="random")
    for loss in (None, LossConfig(content={"relu1_2": 1.0}, style={"relu1_2": 1.0})):
        with pytest.raises(ConfigError, match=r"graph='style' .* needs a loss with style terms only"):
            export_onnx(spec, tmp_path / "s.onnx", graph="style", loss=loss)
    assert os.listdir(tmp_path) == []


# -- what the file holds --------------------------------------------------------------------


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_names_and_shapes_are_dynamic(features_model, distance_model):
    path, spec, result = features_model
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == list(spec.layers)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    for d in (dims[0], dims[2], dims[3]):
        assert d.dim_param and not d.dim_value  # named, not frozen to the export size
    assert result.inputs == ("x",) and result.outputs == spec.layers
    dpath, _, loss, dresult = distance_model
    dmodel = onnx.load(dpath)
    assert [i.name for i in dmodel.graph.input] == ["x", "y"]
    assert tuple(o.name for o in dmodel.graph.output) == loss.output_names() == dresult.outputs
    for o in dmodel.graph.output:
        assert o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_metadata(features_model, distance_model):
    path, spec, result = features_model
    meta = _props(path)
    assert meta["perceptual_engine.format"] == "3"
    assert FeatureSpec.from_dict(json.loads(meta["perceptual_engine.spec"])) == spec
    assert json.loads(meta["perceptual_engine.loss"]) is None
    assert meta["perceptual_engine.graph"] == "features"
    assert meta["perceptual_engine.dtype"] == "float32"
    assert meta["perceptual_engine.version"] == perceptual_engine.__version__
    sha = load_weights(spec).sha256
    assert meta["perceptual_engine.weights_sha256"] == sha == result.weights_sha256
    assert meta["perceptual_engine.weights_source"] == "random(seed=7)"
    dpath, dspec, loss, _ = distance_model
    dmeta = _props(dpath)
    assert dmeta["perceptual_engine.graph"] == "distance"
    assert LossConfig.from_dict(json.loads(dmeta["perceptual_engine.loss"])) == loss


def test_weights_file_source_in_metadata(vgg16_model):
    path, spec, result = vgg16_model
    meta = _props(path)
    assert meta["perceptual_engine.weights_source"] == os.path.abspath(spec.weights)
    assert meta["perceptual_engine.weights_sha256"] == load_weights(spec).sha256


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """One shallow export into a folder that held an older file of the same name,
    under umask 022, with progress messages collected."""
    folder = tmp_path_factory.mktemp("small")
    path = folder / "m.onnx"
    path.write_bytes(b"old")
    spec = FeatureSpec(layers=("relu2_2",), weights="random", seed=1)
    said: list[str] = []
    old = os.umask(0o022)
    try:
        result = export_onnx(spec, path, progress=said.append)
    finally:
        os.umask(old)
    return {"folder": folder, "path": path, "spec": spec, "result": result, "said": said}


def test_one_self_contained_file(small_export):
    folder, path, result = small_export["folder"], small_export["path"], small_export["result"]
    assert sorted(os.listdir(folder)) == ["m.onnx"]
    assert result.path == str(path) and result.size_bytes == os.path.getsize(path)
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
    # The weights are all in the file: 4 convolutions up to relu2_2, float32.
    n_params = sum(t.numel() for t in load_weights(small_export["spec"]).state.values())
    assert result.size_bytes >= 4 * n_params
    onnx.checker.check_model(str(path), full_check=True)


def test_export_replaces_an_existing_file(small_export):
    assert onnx.load(str(small_export["path"])).graph.output[0].name == "relu2_2"


def test_export_file_permissions_follow_umask(small_export):
    # The temporary file is created 0600 by mkstemp; the final model must be readable
    # like any other file the user writes (e.g. by a server running as another user).
    mode = stat.S_IMODE(os.stat(small_export["path"]).st_mode)
    assert mode == 0o644, oct(mode)


def test_progress_messages(small_export):
    said = small_export["said"]
    assert any("verifying" in m for m in said) and said[-1].startswith("wrote ")


def test_export_result_errors_one_per_output(features_model, distance_model):
    for result in (features_model[2], distance_model[3]):
        assert set(result.errors) == set(result.outputs)
        for name, err in result.errors.items():
            assert isinstance(err, OutputError)
            assert 0 <= err.max_rel <= F32_TOL and np.isfinite(err.max_abs), name
        assert result.max_rel_error == max(e.max_rel for e in result.errors.values())
        assert result.dtype == "float32" and result.seconds > 0


def test_export_without_verify_has_no_errors(tmp_path):
    result = export_onnx(FeatureSpec(layers=("relu1_1",), weights="random"), tmp_path / "m.onnx",
                         verify=False)
    assert result.errors == {} and result.max_rel_error == 0.0
    assert os.path.isfile(tmp_path / "m.onnx")


def test_compare_measure():
    e = compare(np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    assert e.max_abs == pytest.approx(0.5) and e.max_rel == pytest.approx(0.25)
    assert compare(np.array([np.nan]), np.array([1.0])).max_rel == float("inf")
    with pytest.raises(ExportError, match="output shape"):
        compare(np.zeros(2), np.zeros(3))


# -- argument checks ------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    spec = FeatureSpec(layers=("relu1_2",), weights="random")
    with pytest.raises(ConfigError, match=r"graph 'logits' is not accepted; accepted: features, distance"):
        export_onnx(spec, tmp_path / "m.onnx", graph="logits")
    with pytest.raises(ConfigError, match=r"dtype 'bfloat16' is not accepted; accepted: float32, float16"):
        export_onnx(spec, tmp_path / "m.onnx", dtype="bfloat16")
    with pytest.raises(ConfigError, match="loss is only used by graph='distance'"):
        export_onnx(spec, tmp_path / "m.onnx", loss=LossConfig(content={"relu1_2": 1.0}))
    with pytest.raises(ConfigError, match=r"content names layer\(s\) \['relu2_2'\]"):
        export_onnx(spec, tmp_path / "m.onnx", graph="distance", loss=LossConfig(content={"relu2_2": 1.0}))
    assert os.listdir(tmp_path) == []


# -- atomic writes --------------------------------------------------------------------------


def _no_temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith(".")]


def test_failed_verification_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model bytes")

    def broken(*a, **kw):
        raise ExportError("simulated parity failure")

    monkeypatch.setattr(exporter, "verify_model", broken)
    with pytest.raises(ExportError, match="simulated parity failure"):
        export_onnx(FeatureSpec(layers=("relu1_2",), weights="random"), path)
    assert path.read_bytes() == b"previous model bytes"
    assert _no_temp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_real_parity_failure_is_reported_and_nothing_written(tmp_path, monkeypatch):
    # A tolerance no output can meet: the real verify path must refuse the file.
    monkeypatch.setitem(exporter.TOLERANCE, "float32", -1.0)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"disagrees with the PyTorch reference .*relu1_2: max abs"
                                          r".*nothing was written"):
        export_onnx(FeatureSpec(layers=("relu1_2",), weights="random"), path)
    assert os.listdir(tmp_path) == []


def test_interrupted_export_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "verify_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(FeatureSpec(layers=("relu1_1",), weights="random"), path)
    assert path.read_bytes() == b"old" and _no_temp_files(tmp_path) == []


# -- float16 --------------------------------------------------------------------------------


def test_fp16_weights_make_large_activations(fp16_models, make_images):
    # The premise of the overflow test: relu4_4 reaches the hundreds and raw Grams
    # (F Fᵀ without 1/sqrt(norm)) would exceed float16's 65504.
    spec = fp16_models["spec"]
    x = make_images((2, 3, 64, 64), seed=10)
    f = _ref_features(spec, x)
    assert f["relu4_4"].max() > 100
    F = f["relu4_4"].astype(np.float64).reshape(2, 512, -1)
    raw_max = float((F @ F.transpose(0, 2, 1)).max())
    assert raw_max > 65504, raw_max
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(raw_max))
    # The 1/sqrt(C·H·W) scaling the graph applies keeps every factor and product small.
    G = (F / np.sqrt(F.shape[1] * F.shape[2])) @ (F / np.sqrt(F.shape[1] * F.shape[2])).transpose(0, 2, 1)
    assert G.max() < 65504


@pytest.mark.parametrize("n, h, w", [(1, 37, 53), (3, 64, 64)])
def test_fp16_features(fp16_models, make_images, rel_err, n, h, w):
    spec = fp16_models["spec"]
    path, result = fp16_models["features"]
    assert result.dtype == "float16" and set(result.errors) == set(spec.layers)
    assert _props(path)["perceptual_engine.dtype"] == "float16"
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    x = make_images((n, 3, h, w), seed=11)
    got = Engine(path, device="cpu").features(x)
    expected = _ref_features(spec, x)
    for name in spec.layers:
        assert got[name].dtype == np.float32
        assert np.isfinite(got[name]).all(), name
        assert rel_err(got[name], expected[name]) <= F16_TOL, name


@pytest.mark.parametrize("n, h, w", [(1, 37, 53), (3, 64, 64)])
def test_fp16_distance_never_overflows(fp16_models, make_images, rel_err, n, h, w):
    spec, loss = fp16_models["spec"], fp16_models["loss"]
    path, result = fp16_models["distance"]
    assert set(result.errors) == set(loss.output_names())
    x, y = make_images((n, 3, h, w), seed=12), make_images((n, 3, h, w), seed=13)
    got = _run(_session(path), {"x": x, "y": y})
    expected = _ref_distance(spec, loss, x, y)
    for k in expected:
        assert got[k].dtype == np.float32
        assert np.isfinite(got[k]).all(), k
        assert rel_err(got[k], expected[k]) <= F16_TOL, k
    assert (got["style.relu4_4"] > 0).all()


def test_fp16_raw_grams_are_computed_in_float32(fp16_models, make_images, rel_err):
    spec, loss = fp16_models["raw_spec"], fp16_models["raw_loss"]
    path, result = fp16_models["raw"]
    x, y = make_images((2, 3, 191, 193), seed=16), make_images((2, 3, 191, 193), seed=17)
    f = _ref_features(spec, np.concatenate([x, y]))
    F = f["relu1_2"].astype(np.float64).reshape(4, 64, -1)
    raw_max = float((F @ F.transpose(0, 2, 1)).max())
    assert raw_max > 65504, raw_max  # raw Grams beyond float16
    got = _run(_session(path), {"x": x, "y": y})
    expected = _ref_distance(spec, loss, x, y)
    for k in expected:
        assert np.isfinite(got[k]).all(), k
        assert rel_err(got[k], expected[k]) <= F16_TOL, k


# -- the optimizer keeps small constants ------------------------------------------------


class _SmallConstants(torch.nn.Module):
    """Stabilizers the default optimizer took for no-ops (|c| <= 1e-8 as 0, c within 1e-5
    of 1 as 1), beside true no-ops it should still remove."""

    def forward(self, f):
        r = torch.sqrt((f * f).sum(dim=1, keepdim=True)) + 1e-10
        s = (f - 1e-12) * (1.0 + 1e-6) / (1.0 - 1e-6)
        return f / r + s + 0.0 - 0.0, (f * 1.0) / 1.0


def test_export_keeps_small_constants():
    proto = exporter._to_onnx(_SmallConstants(), (torch.rand(1, 4, 5, 7),), ("x",), ("a", "b"), False)
    consts = {i.name: float(onnx.numpy_helper.to_array(i)) for i in proto.graph.initializer
              if not i.dims}
    ops = [(n.op_type, consts.get(n.input[1])) for n in proto.graph.node if len(n.input) == 2]
    for kept in (("Add", np.float32(1e-10)), ("Sub", np.float32(1e-12)),
                 ("Mul", np.float32(1.0 + 1e-6)), ("Div", np.float32(1.0 - 1e-6))):
        assert kept in ops, (kept, ops)
    assert not any(c in (0.0, 1.0) for _, c in ops), ops  # exact no-ops still go
    x = np.random.default_rng(0).random((1, 4, 5, 7), dtype=np.float32)
    x[0, :, 2, 3] = 0.0  # a zero vector: 0 / (0 + 1e-10)
    out = _run(_session(proto.SerializeToString()), {"x": x})
    assert np.isfinite(out["a"]).all()
    # the scale (1 + 1e-6) / (1 - 1e-6) = 1 + 2e-6 is there too: rtol 1e-7
    np.testing.assert_allclose(out["a"][0, :, 2, 3], -1e-12 * (1 + 1e-6) / (1 - 1e-6), rtol=1e-7)
    np.testing.assert_array_equal(out["b"], x)
