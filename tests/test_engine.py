"""Engine: metadata, providers, parity, input validation, foreign or damaged files, devices."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import torch

from perceptual_engine import (Engine, FeatureSpec, LossConfig, TorchFeatures, TorchPerceptualLoss,
                               export_onnx, losses)
from perceptual_engine.runtime import ProviderOptions
from perceptual_engine.errors import DeviceError, InputError, ModelError, NonFiniteError, PerceptualError
from perceptual_engine.runtime.backends import onnxruntime as ort_backend
from perceptual_engine.runtime import providers as P

TOL = 1e-4  # max |a - b| / max |b|, float32


@pytest.fixture(scope="module")
def feat(features_model):
    path, spec, _ = features_model
    return Engine(path, device="cpu"), spec


@pytest.fixture(scope="module")
def dist(distance_model):
    path, spec, loss, _ = distance_model
    return Engine(path, device="cpu"), spec, loss


def _img(shape, seed=0, lo=0.0, hi=1.0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(dtype)


# -- metadata and providers -----------------------------------------------------------------


def test_engine_reads_everything_from_metadata(feat, features_model, dist, distance_model):
    engine, spec = feat
    assert engine.spec == spec  # nothing repeated by the caller
    assert engine.info.graph == "features" and engine.info.dtype == "float32"
    assert engine.inputs == ("x",) and engine.output_names == spec.layers
    assert engine.info.weights_sha256 == features_model[2].weights_sha256
    dengine, dspec, loss = dist
    assert dengine.spec == dspec and dengine.info.loss == loss
    assert dengine.inputs == ("x", "y") and dengine.output_names == loss.output_names()


def test_providers_reported(feat):
    engine = feat[0]
    assert engine.providers == ["CPUExecutionProvider"]
    assert engine.providers == engine.session.get_providers()
    assert not engine.on_gpu
    assert "providers=['CPUExecutionProvider']" in repr(engine)


def test_auto_on_machine_without_gpu_is_cpu(features_model, monkeypatch):
    monkeypatch.setattr(P, "cuda_gpu_count", lambda: (0, "no GPU driver"))
    engine = Engine(features_model[0], device="auto")
    assert engine.providers == ["CPUExecutionProvider"]


# -- parity ---------------------------------------------------------------------------------


def test_features_match_reference(feat, rel_err):
    engine, spec = feat
    x = _img((2, 3, 45, 61), seed=1)
    got = engine.features(x)
    with torch.no_grad():
        ref = TorchFeatures(spec)(torch.from_numpy(x))
    assert list(got) == list(spec.layers)
    for name in spec.layers:
        assert isinstance(got[name], np.ndarray) and got[name].dtype == np.float32
        assert got[name].shape == tuple(ref[name].shape)
        assert rel_err(got[name], ref[name].numpy()) <= TOL, name


def test_distance_matches_reference(dist, rel_err):
    engine, spec, loss = dist
    x, y = _img((3, 3, 37, 53), seed=2), _img((3, 3, 37, 53), seed=3)
    got = engine.distance(x, y)
    m = TorchFeatures(spec)
    with torch.no_grad():
        ref = losses.distance_terms(m(torch.from_numpy(x)), m(torch.from_numpy(y)), loss)
    assert list(got) == list(loss.output_names())
    for k in ref:
        assert got[k].shape == (3,)
        assert rel_err(got[k], ref[k].numpy()) <= TOL, k
    assert (got["total"] > 0).all()


def test_torch_cpu_tensors_accepted(feat, dist):
    engine, _ = feat
    x = _img((1, 3, 37, 53), seed=4)
    a = engine.features(x)
    b = engine.features(torch.from_numpy(x))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Non-contiguous tensors are made contiguous first.
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))).transpose(2, 3)
    assert not t.is_contiguous()
    c = engine.features(t)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    # Same for a non-contiguous numpy view (e.g. an NHWC array transposed to NCHW).
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    view = nhwc.transpose(0, 3, 1, 2)
    assert not view.flags.c_contiguous
    d = engine.features(view)
    for k in a:
        np.testing.assert_array_equal(a[k], d[k])
    dengine = dist[0]
    y = _img((1, 3, 37, 53), seed=5)
    d1, d2 = dengine.distance(x, y), dengine.distance(torch.from_numpy(x), torch.from_numpy(y))
    for k in d1:
        np.testing.assert_array_equal(d1[k], d2[k])


def test_engine_is_thread_safe(dist):
    engine = dist[0]
    x, y = _img((1, 3, 37, 53), seed=6), _img((1, 3, 37, 53), seed=7)
    expected = engine.distance(x, y)["total"]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(engine.distance(x, y)["total"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_wrong_graph_kind(feat, dist):
    x = _img((1, 3, 37, 53), seed=8)
    with pytest.raises(ModelError, match=r"is a features graph; distance\(\) needs a model exported with "
                                         r"graph='distance'"):
        feat[0].distance(x, x)
    with pytest.raises(ModelError, match=r"is a distance graph; features\(\) needs a model exported with "
                                         r"graph='features'"):
        dist[0].features(x)


def test_features_on_a_style_model_names_the_graph_kind(style_model):
    engine = Engine(style_model[0], device="cpu")
    with pytest.raises(ModelError, match=r"is a style graph; features\(\) needs a model exported with "
                                         r"graph='features'"):
        engine.features(_img((1, 3, 37, 53)))


def test_distance_needs_y_on_a_distance_model(dist):
    with pytest.raises(InputError, match=r"distance\(x, y\) needs y on a distance model"):
        dist[0].distance(_img((1, 3, 37, 53)))


# -- cached style target (graph="style") ----------------------------------------------------


@pytest.fixture(scope="module")
def style(style_model):
    path, spec, loss, _ = style_model
    return Engine(path, device="cpu"), spec, loss


def test_style_target_matches_reference(style, rel_err):
    engine, spec, loss = style
    assert engine.inputs == ("x", "target.gram.relu1_2", "target.gram.relu3_1")
    target = _img((1, 3, 41, 45), seed=20)
    x = _img((3, 3, 37, 53), seed=21)
    engine.set_style_target(target)
    got = engine.distance(x)
    assert list(got) == ["style.relu1_2", "style.relu3_1", "total"]
    ref = TorchPerceptualLoss(spec, loss)
    ref.set_style_target(torch.from_numpy(target))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x))
    for k in expected:
        assert got[k].shape == (3,)
        assert rel_err(got[k], expected[k].numpy()) <= TOL, k
    # Torch CPU tensors too; the target stays cached between calls.
    again = engine.distance(torch.from_numpy(x))
    for k in got:
        np.testing.assert_array_equal(again[k], got[k])
    # The same image as x and target: zero distance.
    same = engine.distance(np.concatenate([target, target]))
    np.testing.assert_allclose(same["total"], 0.0, atol=1e-6)


def test_style_model_misuse(style_model, dist):
    engine = Engine(style_model[0], device="cpu")
    x = _img((1, 3, 37, 53), seed=22)
    with pytest.raises(InputError, match=r"no style target is set; call engine\.set_style_target"):
        engine.distance(x)
    with pytest.raises(InputError, match=r"the style target has batch 2; accepted: one image"):
        engine.set_style_target(_img((2, 3, 37, 53)))
    with pytest.raises(InputError, match=r"dtype uint8; accepted: float32"):
        engine.set_style_target(np.zeros((1, 3, 37, 53), np.uint8))
    engine.set_style_target(x)
    with pytest.raises(InputError, match=r"this is a style model: call distance\(x\) after set_style_target"):
        engine.distance(x, x)
    with pytest.raises(ModelError, match=r"is a distance graph; set_style_target needs a model exported with "
                                         r"graph='style'"):
        dist[0].set_style_target(x)


# -- input validation -----------------------------------------------------------------------

# relu3_1 is the deepest layer of both fixtures: 4x downsampling.
GOOD = (1, 3, 37, 53)


@pytest.mark.parametrize("x, pattern", [
    (_img((3, 37, 53)), r"x has shape \(3, 37, 53\) \(rank 3\); accepted: rank 4, \(N, 3, H, W\)\. "
                        r"Add a batch axis: x\[None\]"),
    (_img((2, 1, 3, 37, 53)), r"x has shape \(2, 1, 3, 37, 53\) \(rank 5\); accepted: rank 4"),
    (_img((37, 53)), r"rank 2\); accepted: rank 4"),
    (_img((1, 1, 37, 53)), r"x has 1 channels \(shape \(1, 1, 37, 53\)\); accepted: 3 \(RGB\).*gray: repeat"),
    (_img((1, 2, 37, 53)), r"x has 2 channels .*accepted: 3 \(RGB\)"),
    (_img((1, 4, 37, 53)), r"x has 4 channels .*accepted: 3 \(RGB\).*RGBA"),
    (_img((1, 37, 53, 3)), r"x has 37 channels .*accepted: 3.*channels-last \(N, H, W, C\): transpose"),
    ((np.random.default_rng(0).integers(0, 255, GOOD)).astype(np.uint8),
     r"x has dtype uint8; accepted: float32\..*Divide uint8 images by 255"),
    (_img(GOOD).astype(np.int32), r"x has dtype int32; accepted: float32"),
    (_img(GOOD).astype(np.float64), r"x has dtype float64; accepted: float32\. Convert it, e\.g\. "
                                    r"x\.astype\(np\.float32\)"),
    (_img(GOOD).astype(np.float16), r"x has dtype float16; accepted: float32"),
    (_img(GOOD) > 0.5, r"x has dtype bool; accepted: float32"),
    (np.zeros((0, 3, 37, 53), np.float32), r"x is empty \(shape \(0, 3, 37, 53\)\); accepted: N, H, W >= 1"),
    (np.zeros((1, 3, 0, 53), np.float32), r"x is empty"),
    (_img((1, 3, 3, 53)), r"x is 3x53, too small for relu3_1 \(4x downsampling\); accepted: height and "
                          r"width >= 4"),
    (_img((1, 3, 37, 2)), r"x is 37x2, too small for relu3_1"),
    ([[[[0.5]]]], r"input is a list; accepted: a numpy array or torch tensor of shape \(N, 3, H, W\)"),
    (torch.from_numpy(_img(GOOD)).double(), r"x has dtype float64; accepted: float32"),
    (torch.from_numpy(_img((3, 37, 53))), r"rank 3\); accepted: rank 4"),
])
def test_invalid_input(feat, x, pattern):
    with pytest.raises(InputError, match=pattern) as exc:
        feat[0].features(x)
    assert isinstance(exc.value, PerceptualError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(feat, dist, bad):
    x = _img(GOOD, seed=9)
    x[0, 1, 5, 7] = bad
    with pytest.raises(InputError, match=r"x contains NaN or Inf values in sample\(s\) \[0\] \(of 1\); accepted: finite values"):
        feat[0].features(x)
    with pytest.raises(InputError, match=r"y contains NaN or Inf values"):
        dist[0].distance(_img(GOOD), x)
    with pytest.raises(InputError, match=r"NaN or Inf"):
        feat[0].features(torch.from_numpy(x))


def test_shape_mismatch(dist):
    with pytest.raises(InputError, match=r"x has shape \(1, 3, 37, 53\) but y has \(1, 3, 37, 54\); "
                                         r"accepted: equal shapes"):
        dist[0].distance(_img(GOOD), _img((1, 3, 37, 54)))
    with pytest.raises(InputError, match=r"but y has \(2, 3, 37, 53\)"):
        dist[0].distance(_img(GOOD), _img((2, 3, 37, 53)))


def test_y_is_validated_too(dist):
    with pytest.raises(InputError, match=r"y has dtype float64; accepted: float32"):
        dist[0].distance(_img(GOOD), _img(GOOD).astype(np.float64))


@pytest.mark.parametrize("lo, hi, shown", [(0.0, 255.0, r"\[0, 255\]"), (-1.0, 1.0, r"\[-1, 1\]")])
def test_out_of_range_values(feat, lo, hi, shown):
    x = _img(GOOD, seed=10, lo=lo, hi=hi)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = lo, hi
    with pytest.raises(InputError, match=rf"x has values in {shown}, outside the model's input range "
                                         r"\[0, 1\]\. Clip or rescale it \(0\.\.255 images: divide by 255\)"):
        feat[0].features(x)


def test_range_tolerance_and_opt_out(features_model):
    path = features_model[0]
    x = _img(GOOD, seed=11)
    x[0, 0, 0, 0] = 1.0005  # within the 1e-3 tolerance for rounding
    Engine(path, device="cpu").features(x)
    x[0, 0, 0, 0] = 3.0
    out = Engine(path, device="cpu", check_range=False).features(x)
    assert np.isfinite(out["relu1_2"]).all()


def test_pixel_budget(features_model):
    engine = Engine(features_model[0], device="cpu", max_pixels=2 * 37 * 53)
    engine.features(_img((2, 3, 37, 53)))
    with pytest.raises(InputError, match=r"x has 3x37x53 = 5883 pixels, over the budget of 3922; split the "
                                         r"batch or raise max_pixels"):
        engine.features(_img((3, 3, 37, 53)))


# -- foreign or damaged files ---------------------------------------------------------------


def _edit(src, dst, change):
    model = onnx.load(src)
    change(model)
    onnx.save(model, str(dst))
    return str(dst)


def _set_prop(model, key, value):
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    raise KeyError(key)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelError, match=r"model '.*nope\.onnx' is missing; give the path of an exported "
                                         r"\.onnx file"):
        Engine(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        Engine(tmp_path)


def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "image.onnx"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(ModelError, match=r"is not a readable ONNX model .*it may be truncated or another "
                                         r"kind of file"):
        Engine(p)


def test_truncated_file(tmp_path, features_model):
    data = open(features_model[0], "rb").read()
    p = tmp_path / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"not a readable ONNX model|without perceptual-engine metadata"):
        Engine(p)


def test_onnx_without_our_metadata(tmp_path, features_model):
    p = _edit(features_model[0], tmp_path / "foreign.onnx", lambda m: m.ClearField("metadata_props"))
    with pytest.raises(ModelError, match=r"an ONNX model without perceptual-engine metadata; accepted: a "
                                         r"model written by perceptual_engine\.export_onnx"):
        Engine(p)


def test_newer_metadata_format(tmp_path, features_model):
    p = _edit(features_model[0], tmp_path / "newer.onnx",
              lambda m: _set_prop(m, "perceptual_engine.format", "4"))
    with pytest.raises(ModelError, match=r"has metadata format '4'; this version of perceptual-engine reads "
                                         r"format 3\. Upgrade perceptual-engine"):
        Engine(p)


@pytest.mark.parametrize("key, value", [
    ("perceptual_engine.spec", "{not json"),
    ("perceptual_engine.spec", '{"arch": "vgg99"}'),
    ("perceptual_engine.format", "one"),
])
def test_damaged_metadata(tmp_path, features_model, key, value):
    p = _edit(features_model[0], tmp_path / "damaged.onnx", lambda m: _set_prop(m, key, value))
    with pytest.raises(ModelError, match=rf"metadata key {key} holds .*re-export the model"):
        Engine(p)


def _resealed(change):
    """``change``, then the digests recomputed: an edit that integrity.py cannot see, so
    the Engine's own check of names against the metadata is what must catch it."""
    from perceptual_engine.export.integrity import seal
    from perceptual_engine.export.metadata import ModelInfo

    def edit(m):
        info = ModelInfo.from_props({p.key: p.value for p in m.metadata_props}, "edited")
        change(m)
        seal(m, info)
    return edit


def test_edited_graph_is_refused_unless_resealed(tmp_path, features_model):
    p = _edit(features_model[0], tmp_path / "dropped0.onnx", lambda m: m.graph.output.pop())
    with pytest.raises(ModelError, match=r"weights or graph .* do not match the graph_sha256 recorded at "
                                         r"export .*edited after export"):
        Engine(p)


def test_outputs_disagree_with_metadata(tmp_path, features_model):
    def drop_last_output(m):
        m.graph.output.pop()

    p = _edit(features_model[0], tmp_path / "dropped.onnx", _resealed(drop_last_output))
    with pytest.raises(ModelError, match=r"has inputs \('x',\) and outputs \('conv1_1', 'relu1_2', "
                                         r"'relu2_2', 'conv3_1'\), but its metadata promises \('x',\) and "
                                         r"\('conv1_1', 'relu1_2', 'relu2_2', 'conv3_1', 'relu3_1'\).*"
                                         r"Re-export it"):
        Engine(p)


def test_metadata_claims_the_other_graph_kind(tmp_path, features_model):
    p = _edit(features_model[0], tmp_path / "liar.onnx",
              lambda m: _set_prop(m, "perceptual_engine.graph", "distance"))
    with pytest.raises(ModelError, match=r"metadata keys disagree: perceptual_engine\.loss is null, but a distance graph "
                                         r"needs one"):
        Engine(p)


def test_renamed_output(tmp_path, features_model):
    def rename(m):
        old = m.graph.output[0].name
        m.graph.output[0].name = "features0"
        for node in m.graph.node:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name == old:
                        names[i] = "features0"

    p = _edit(features_model[0], tmp_path / "renamed.onnx", _resealed(rename))
    with pytest.raises(ModelError, match=r"outputs \('features0', .*the file was edited or damaged"):
        Engine(p)


# -- devices --------------------------------------------------------------------------------


def test_cuda_request_served_by_cpu_is_an_error(features_model, monkeypatch):
    # The session reports CPU although CUDA was asked: never a silent CPU run.
    monkeypatch.setattr(P, "plan", lambda device, *a, **k: [("CPUExecutionProvider", {})])
    import onnxruntime as ort

    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match=r"device 'cuda' was requested but ONNX Runtime could not start "
                                          r"CUDAExecutionProvider \(the session got \['CPUExecutionProvider'\]\)"
                                          r".*Use device='cpu' to run on the CPU deliberately"):
        Engine(features_model[0], device="cuda")


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_explicit_gpu_without_gpu(features_model, monkeypatch, device):
    monkeypatch.setattr(P, "cuda_gpu_count", lambda: (0, "the NVIDIA driver reports no GPU"))
    monkeypatch.setattr(P, "available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(DeviceError, match=rf"device '{device}' needs a CUDA GPU, but the NVIDIA driver "
                                          r"reports no GPU"):
        Engine(features_model[0], device=device)


def test_session_creation_failure_on_gpu_is_a_device_error(features_model, monkeypatch):
    monkeypatch.setattr(P, "plan", lambda device, *a, **k: [("CUDAExecutionProvider", {}),
                                                           ("CPUExecutionProvider", {})])
    monkeypatch.setattr(ort_backend, "preload_cuda", lambda: None)
    import onnxruntime as ort

    def fail(*a, **k):
        raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected\nmore detail")

    monkeypatch.setattr(ort, "InferenceSession", fail)
    with pytest.raises(DeviceError, match=r"device 'cuda' was requested .*\(CUDA failure 100: no "
                                          r"CUDA-capable device is detected\)"):
        Engine(features_model[0], device="cuda")


def test_auto_falls_back_to_cpu_when_the_gpu_session_fails(features_model, monkeypatch):
    # "auto" tries TensorRT, then CUDA, then CPU: a GPU provider that fails to start
    # (driver/library mismatch) must not make a valid model unusable or be blamed on the file.
    monkeypatch.setattr(P, "plan", lambda device, *a, **k: [("CUDAExecutionProvider", {}),
                                                           ("CPUExecutionProvider", {})])
    monkeypatch.setattr(ort_backend, "preload_cuda", lambda: None)
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, so=None, providers=None, **kw):
        if any((p[0] if isinstance(p, tuple) else p) != "CPUExecutionProvider" for p in providers or ()):
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version")
        return real(path, so, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.warns(RuntimeWarning, match="skips CUDAExecutionProvider failed: .*trying CPUExecutionProvider"):
        engine = Engine(features_model[0], device="auto")
    assert engine.providers == ["CPUExecutionProvider"]
    assert "CUDA driver version is insufficient" in engine.fallback_reason
    out = engine.features(_img((1, 3, 37, 53), seed=23))
    assert set(out) == set(features_model[1].layers)


def test_auto_goes_from_a_failing_tensorrt_to_cuda_not_to_the_cpu(features_model, monkeypatch):
    trt, cuda = ("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {})
    monkeypatch.setattr(P, "plan", lambda device, *a, **k: [trt, cuda, ("CPUExecutionProvider", {})])
    monkeypatch.setattr(ort_backend, "preload_cuda", lambda: None)
    import onnxruntime as ort

    real = ort.InferenceSession
    tried = []

    class FakeSession:  # CUDA "starts"; the graph itself runs on the CPU provider
        def __init__(self, path, so=None, providers=None, **kw):
            self.names = [p[0] if isinstance(p, tuple) else p for p in providers]
            tried.append(self.names[0])
            if self.names[0] == trt[0]:
                raise RuntimeError("TensorRT EP could not build the engine")
            self.real = real(path, so, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return self.names

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.warns(RuntimeWarning, match="skips TensorrtExecutionProvider failed.*trying CUDAExecutionProvider"):
        engine = Engine(features_model[0], device="auto")
    assert tried == [trt[0], cuda[0]]
    assert engine.providers[0] == cuda[0] and engine.on_gpu
    assert "TensorrtExecutionProvider failed: TensorRT EP could not build" in engine.fallback_reason


def test_the_main_session_never_captures_cuda_graphs(features_model, monkeypatch):
    seen = []
    real_plan = P.plan

    def plan(device, options, inputs, key):
        seen.append((options.cuda_graph, tuple(i.name for i in inputs)))
        return real_plan("cpu", options, inputs, key)

    monkeypatch.setattr(P, "plan", plan)
    Engine(features_model[0], device="cpu", options=ProviderOptions(cuda_graph=True, fixed_shapes=True))
    assert seen == [(False, ("x",))]


def test_tensorrt_profile_covers_the_image_inputs_only(tmp_path, monkeypatch):
    spec = FeatureSpec(layers=("relu1_2",), weights="random")
    path = str(tmp_path / "style.onnx")
    export_onnx(spec, path, graph="style", loss=LossConfig(style={"relu1_2": 1.0}))
    seen = []
    real_plan = P.plan

    def plan(device, options, inputs, key):
        seen.append(tuple(i.name for i in inputs))
        return real_plan("cpu", options, inputs, key)

    monkeypatch.setattr(P, "plan", plan)
    Engine(path, device="cpu")
    assert seen == [("x",)]  # not target.gram.relu1_2, whose (1, 64, 64) shape is static


def test_unknown_device(features_model):
    with pytest.raises(PerceptualError, match=r"device 'gpu0' is not accepted; accepted: auto, cpu, cuda, "
                                              r"tensorrt, openvino"):
        Engine(features_model[0], device="gpu0")


# -- GPU (skipped without one) --------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_engine_matches_reference_without_tf32(features_model, rel_err):
    from perceptual_engine.runtime import ProviderOptions

    path, spec, _ = features_model
    engine = Engine(path, device="cuda", options=ProviderOptions(tf32=False))
    assert engine.providers[0] == "CUDAExecutionProvider" and engine.on_gpu
    x = _img((2, 3, 64, 64), seed=12)
    got = engine.features(x)
    with torch.no_grad():
        ref = TorchFeatures(spec)(torch.from_numpy(x))
    for name in spec.layers:
        assert rel_err(got[name], ref[name].numpy()) <= TOL, name
    if torch.cuda.is_available():
        t = torch.from_numpy(x).cuda()
        out = engine.features(t)
        for name in spec.layers:
            assert out[name].is_cuda
            assert rel_err(out[name].cpu().numpy(), ref[name].numpy()) <= TOL, name


def test_a_sample_that_overflows_is_named_and_the_others_kept(distance_model):
    path = distance_model[0]
    engine = Engine(path, device="cpu", check_range=False)
    x, y = _img((3, 3, 37, 53), seed=40), _img((3, 3, 37, 53), seed=41)
    x[1] *= 1e30  # finite input, but its Grams overflow float32
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[1\] is not finite") as info:
        engine.distance(x, y)
    assert info.value.bad == [1]
    got = info.value.out["total"]
    np.testing.assert_allclose(got[[0, 2]], engine.distance(x[[0, 2]], y[[0, 2]])["total"], rtol=1e-5)


def test_device_error_names_the_wheels_of_the_missing_libraries(monkeypatch):
    monkeypatch.setattr(P, "missing_cuda_libraries", lambda: ["libcudnn.so.9", "libcublasLt.so.13"])
    msg = ort_backend.why_not("cuda", RuntimeError("Failed to load libonnxruntime_providers_cuda.so"))
    assert "missing libraries: libcudnn.so.9, libcublasLt.so.13" in msg
    assert "pip install nvidia-cublas nvidia-cudnn-cu13" in msg and "device='cpu'" in msg


def test_non_finite_input_sample_is_named_and_the_others_computed(dist):
    engine = dist[0]
    x = np.concatenate([_img(GOOD, seed=s) for s in (1, 2, 3)])
    y = np.concatenate([_img(GOOD, seed=s) for s in (4, 5, 6)])
    y[1, 0, 3, 4] = np.nan
    with pytest.raises(NonFiniteError, match=r"input of sample\(s\) \[1\] holds NaN or Inf") as info:
        engine.distance(x, y)
    assert info.value.bad == [1] and info.value.inputs
    total = info.value.out["total"]
    assert np.isnan(total[1])
    alone = engine.distance(x[[0, 2]], y[[0, 2]])["total"]
    np.testing.assert_allclose(total[[0, 2]], alone, rtol=1e-6)
    x[2, 1, 0, 0] = np.inf  # x's and y's bad samples together
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[1, 2\]"):
        engine.distance(x, y)
    with pytest.raises(InputError, match=r"y contains NaN or Inf values in sample\(s\) \[0\]"):
        engine.distance(x[[1]], y[[1]])  # nothing left to compute: the plain input error
