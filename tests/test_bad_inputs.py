"""The bad-input catalogue, through the API: arrays, models, weights.

Each case must raise a PerceptualError subclass whose message names what was
received and says what to do; nothing crashes with a bare exception.
(File and command-line cases live in test_bad_inputs_cli.py.)
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import onnx
import pytest
import torch

from perceptual_engine import Engine, FeatureSpec, LossConfig, PerceptualError, export_onnx
from perceptual_engine.errors import InputError, ModelError, WeightsError
from perceptual_engine.export.metadata import PREFIX
from perceptual_engine.weights import load_weights

SPEC = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "d.onnx"
    export_onnx(SPEC, path, graph="distance", loss=LossConfig(content={"relu2_2": 1.0}))
    return str(path)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, device="cpu", max_pixels=4 * 64 * 64)


def _img(n=1, c=3, h=17, w=19, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).random((n, c, h, w)).astype(dtype)


def _with(a, idx, value):
    a = a.copy()
    a[idx] = value
    return a


ARRAY_CASES = {
    "rank 3": (lambda: _img()[0], "rank 3.*Add a batch axis"),
    "rank 5": (lambda: _img()[None], "rank 5"),
    "rank 2": (lambda: _img()[0, 0], "rank 2"),
    "1 channel": (lambda: _img(c=1), "1 channels.*accepted: 3"),
    "2 channels": (lambda: _img(c=2), "2 channels"),
    "4 channels": (lambda: _img(c=4), "4 channels.*RGBA"),
    "channels last": (lambda: _img().transpose(0, 2, 3, 1).copy(), "channels-last"),
    "uint8": (lambda: (_img() * 255).astype(np.uint8), "uint8.*Divide uint8 images by 255"),
    "int32": (lambda: (_img() * 255).astype(np.int32), "int32.*accepted: float32"),
    "int64": (lambda: (_img() * 255).astype(np.int64), "int64"),
    "float64": (lambda: _img(dtype=np.float64), "float64.*astype\\(np.float32\\)"),
    "float16": (lambda: _img(dtype=np.float16), "float16.*accepted: float32"),
    "bool": (lambda: _img() > 0.5, "bool"),
    "NaN": (lambda: _with(_img(), (0, 1, 2, 3), np.nan), "NaN or Inf"),
    "+Inf": (lambda: _with(_img(), (0, 0, 0, 0), np.inf), "NaN or Inf"),
    "-Inf": (lambda: _with(_img(), (0, 2, 5, 1), -np.inf), "NaN or Inf"),
    "empty batch": (lambda: np.zeros((0, 3, 17, 19), np.float32), "empty"),
    "zero height": (lambda: np.zeros((1, 3, 0, 19), np.float32), "empty"),
    "too small": (lambda: _img(h=1, w=9), "too small for relu2_2.*>= 2"),
    "above range": (lambda: _img() * 255, "outside the model's input range.*divide by 255"),
    "below range": (lambda: _img() - 0.5, "outside the model's input range"),
    "over pixel budget": (lambda: np.ones((5, 3, 64, 64), np.float32) * 0.5, "over the budget"),
    "python list": (lambda: _img().tolist(), "list.*numpy array or torch tensor"),
    "torch int tensor": (lambda: torch.ones(1, 3, 17, 19, dtype=torch.int64), "int64"),
}


@pytest.mark.parametrize("case", sorted(ARRAY_CASES))
def test_bad_array_through_engine(engine, case):
    make, pattern = ARRAY_CASES[case]
    x = make()
    y = _img(seed=1) if getattr(x, "shape", None) is None or len(x.shape) != 4 else None
    with pytest.raises(InputError, match=pattern):
        engine.distance(x, x if y is None else y)


def test_x_and_y_of_different_shapes(engine):
    with pytest.raises(InputError, match=r"x has shape \(1, 3, 17, 19\) but y has \(1, 3, 19, 17\)"):
        engine.distance(_img(), _img(h=19, w=17))
    nan = _img(h=19, w=17)
    nan[0, 1, 2, 3] = np.nan  # the cheap shape check speaks before any value is scanned
    with pytest.raises(InputError, match=r"x has shape \(1, 3, 17, 19\) but y has"):
        engine.distance(_img(), nan)
    inf = _img(seed=3)
    inf[0, 2, 5, 7] = -np.inf
    with pytest.raises(InputError, match="y contains NaN or Inf"):
        engine.distance(_img(), inf)


def test_error_keeps_engine_usable(engine):
    with pytest.raises(InputError):
        engine.distance(_img(dtype=np.float64), _img())
    out = engine.distance(_img(), _img(seed=2))
    assert np.isfinite(out["total"]).all()


@pytest.mark.parametrize("layout", ["non-contiguous", "channels_last torch", "strided torch"])
def test_unusual_layouts_are_read_correctly(engine, layout):
    x, y = _img(h=20, w=24), _img(h=20, w=24, seed=3)
    expected = engine.distance(x, y)["total"]
    if layout == "non-contiguous":
        big = np.zeros((1, 3, 40, 24), np.float32)
        big[:, :, ::2] = x
        got = engine.distance(big[:, :, ::2], y)["total"]
    elif layout == "channels_last torch":
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        assert not t.is_contiguous()
        got = engine.distance(t, torch.from_numpy(y))["total"]
    else:
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))).transpose(2, 3)
        got = engine.distance(t, torch.from_numpy(y))["total"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# -- models ------------------------------------------------------------------

def _edited(model, tmp_path, edit):
    m = onnx.load(model)
    edit(m)
    path = tmp_path / "edited.onnx"
    onnx.save_model(m, path)
    return path


def _drop_metadata(m):
    del m.metadata_props[:]


def _newer_format(m):
    for p in m.metadata_props:
        if p.key == PREFIX + "format":
            p.value = "99"


def _rename_output(m):
    m.graph.output[0].name = "content.relu9_9"
    for node in m.graph.node:
        for names in (node.input, node.output):
            names[:] = ["content.relu9_9" if o == "content.relu2_2" else o for o in names]


def _damage_spec(m):
    for p in m.metadata_props:
        if p.key == PREFIX + "spec":
            p.value = "{not json"


MODEL_CASES = {
    "not onnx": (lambda model, tmp: _write(tmp / "x.onnx", b"this is not a model\n" * 10),
                 "not a readable ONNX model"),
    "truncated": (lambda model, tmp: _write(tmp / "t.onnx", open(model, "rb").read()[:100000]),
                  "not a readable ONNX model.*truncated"),
    "empty file": (lambda model, tmp: _write(tmp / "e.onnx", b""), "without perceptual-engine metadata|not a readable"),
    "no metadata": (lambda model, tmp: _edited(model, tmp, _drop_metadata), "without perceptual-engine metadata"),
    "newer format": (lambda model, tmp: _edited(model, tmp, _newer_format), "format '99'.*Upgrade"),
    "outputs disagree": (lambda model, tmp: _edited(model, tmp, _rename_output), "edited after export"),
    "damaged metadata": (lambda model, tmp: _edited(model, tmp, _damage_spec),
                         "metadata key perceptual_engine.spec holds '{not json' \\(not JSON"),
    "missing": (lambda model, tmp: tmp / "nope.onnx", "missing"),
    "a folder": (lambda model, tmp: tmp, "is a folder"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model(model, tmp_path, case):
    make, pattern = MODEL_CASES[case]
    with pytest.raises(ModelError, match=pattern):
        Engine(make(model, tmp_path), device="cpu")


# -- weights -----------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state():
    return {k: v.clone() for k, v in load_weights(SPEC).state.items()}


def _bad_weights(case, tmp_path):
    st = _state()
    if case == "pickle executing code":
        marker = tmp_path / "pwned"
        path = tmp_path / "evil.pth"
        with open(path, "wb") as fh:
            pickle.dump({"features.0.weight": _Evil(str(marker))}, fh)
        return path, "refused.*could execute code"
    if case == "wrong shapes":
        st["features.2.weight"] = torch.randn(64, 64, 5, 5)
        path = tmp_path / "shape.pth"
    elif case == "missing keys":
        del st["features.2.bias"]
        path = tmp_path / "missing.pth"
    elif case == "safetensors int dtype":
        from safetensors.torch import save_file

        st["features.0.weight"] = st["features.0.weight"].to(torch.int32)
        path = tmp_path / "int.safetensors"
        save_file(st, str(path))
        return path, "dtype torch.int32.*floating-point"
    elif case == "truncated":
        path = tmp_path / "trunc.pth"
        torch.save(st, path)
        path.write_bytes(path.read_bytes()[:2000])
        return path, "could not be read.*truncated"
    elif case == "not a state dict":
        path = tmp_path / "list.pth"
        torch.save([1, 2, 3], path)
        return path, "holds a list, not a state dict"
    torch.save(st, path)
    return path, {"wrong shapes": "has shape \\(64, 64, 5, 5\\)", "missing keys": "lack 1 key.*features.2.bias"}[case]


@pytest.mark.parametrize("case", ["pickle executing code", "wrong shapes", "missing keys",
                                  "safetensors int dtype", "truncated", "not a state dict"])
def test_bad_weights(tmp_path, case):
    path, pattern = _bad_weights(case, tmp_path)
    with pytest.raises(WeightsError, match=pattern):
        load_weights(FeatureSpec(layers=SPEC.layers, weights=str(path)))
    assert not (tmp_path / "pwned").exists()


def test_every_catalogue_error_is_a_perceptual_error():
    for cls in (InputError, ModelError, WeightsError):
        assert issubclass(cls, PerceptualError)
