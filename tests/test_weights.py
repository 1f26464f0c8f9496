"""Weights: seeded random, files (.pth/.safetensors), the ImageNet download (mocked), refusals."""
from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch

from perceptual_engine import FeatureSpec, PerceptualError
from perceptual_engine import layers as L
from perceptual_engine import weights as W
from perceptual_engine.errors import WeightsError


def _conv_keys(arch: str, upto: str) -> list[str]:
    last = L.resolve(arch, upto).index
    return [f"features.{i.index}.{p}" for i in L.table(arch)
            if i.kind == "conv" and i.index <= last for p in ("weight", "bias")]


# -- random ---------------------------------------------------------------------------------


def test_random_weights_reproducible_per_seed():
    spec = FeatureSpec(layers=("relu2_2",), weights="random", seed=3)
    a, b = W.load_weights(spec), W.load_weights(spec)
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert a.source == "random(seed=3)"
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])
    c = W.load_weights(FeatureSpec(layers=("relu2_2",), weights="random", seed=4))
    assert c.sha256 != a.sha256
    assert not torch.equal(c.state["features.0.weight"], a.state["features.0.weight"])


def test_random_weights_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    W.load_weights(FeatureSpec(layers=("relu1_2",), weights="random", seed=0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch, upto", [("vgg19", "relu4_4"), ("vgg16", "relu3_3"), ("vgg19", "conv1_1")])
def test_random_weights_cover_exactly_the_truncated_convs(arch, upto):
    w = W.load_weights(FeatureSpec(arch=arch, layers=(upto,), weights="random"))
    assert sorted(w.state) == sorted(_conv_keys(arch, upto))
    for k, t in w.state.items():
        assert t.dtype == torch.float32
        assert t.abs().max() > 0, k  # never all zeros: biases included
        idx = int(k.split(".")[1])
        info = L.table(arch)[idx]
        shape = (info.channels, info.in_channels, 3, 3) if k.endswith("weight") else (info.channels,)
        assert tuple(t.shape) == shape


# -- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, upto", [("vgg19", "relu4_4"), ("vgg16", "relu4_3")])
def test_pth_and_safetensors_round_trip(arch, upto, tv_state, tv_weights_file):
    state = tv_state(arch)
    loaded = {}
    for ext in (".pth", ".safetensors"):
        spec = FeatureSpec(arch=arch, layers=(upto,), weights=tv_weights_file(arch, ext))
        w = W.load_weights(spec)
        assert w.source == os.path.abspath(spec.weights)
        # Extra keys (classifier.*) are ignored; only convolutions up to upto are kept.
        assert sorted(w.state) == sorted(_conv_keys(arch, upto))
        for k, t in w.state.items():
            assert torch.equal(t, state[k]), k
        loaded[ext] = w
    assert loaded[".pth"].sha256 == loaded[".safetensors"].sha256
    # The hash is of the tensors, not of the file: the same numbers from another source match.
    assert W._digest({k: state[k] for k in _conv_keys(arch, upto)}) == loaded[".pth"].sha256


def test_state_dict_wrapped_in_state_dict_key_and_bare_features(tmp_path, tv_state):
    state = {k: v for k, v in tv_state("vgg19").items() if k.startswith("features.")}
    spec_layers = ("relu2_2",)
    expected = W.load_weights(FeatureSpec(layers=spec_layers, weights=_save(tmp_path / "a.pth", state))).sha256
    wrapped = _save(tmp_path / "wrapped.pth", {"state_dict": state, "epoch": 3})
    assert W.load_weights(FeatureSpec(layers=spec_layers, weights=wrapped)).sha256 == expected
    bare = _save(tmp_path / "bare.pth", {k[len("features."):]: v for k, v in state.items()})
    assert W.load_weights(FeatureSpec(layers=spec_layers, weights=bare)).sha256 == expected


def test_float64_and_float16_files_are_converted_to_float32(tmp_path, tv_state):
    state = {k: v for k, v in tv_state("vgg19").items() if k.startswith("features.")}
    p = _save(tmp_path / "f64.pth", {k: v.double() for k, v in state.items()})
    w = W.load_weights(FeatureSpec(layers=("relu1_2",), weights=p))
    assert all(t.dtype == torch.float32 for t in w.state.values())
    assert torch.equal(w.state["features.0.weight"], state["features.0.weight"])


def _save(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def _save_st(path, obj) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    return str(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file '.*nope\.pth' is missing; give the path of a "
                                           r"\.pth or \.safetensors file"):
        W.load_weights(FeatureSpec(weights=str(tmp_path / "nope.pth")))
    folder = tmp_path / "dir.pth"
    folder.mkdir()
    with pytest.raises(WeightsError, match="is a folder"):
        W.load_weights(FeatureSpec(weights=str(folder)))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_truncated_file(ext, tmp_path, tv_weights_file):
    data = open(tv_weights_file("vgg19", ext), "rb").read()
    path = tmp_path / f"half{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"could not be read .*it may be truncated or not a "
                                           r"\.pth/\.safetensors file"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=str(path)))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_not_a_weights_file(ext, tmp_path):
    path = tmp_path / f"text{ext}"
    path.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(WeightsError, match=r"could not be read|was refused"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=str(path)))


def test_pth_holding_a_tensor_not_a_dict(tmp_path):
    p = _save(tmp_path / "t.pth", torch.randn(3, 3))
    with pytest.raises(WeightsError, match="holds a Tensor, not a state dict; save model.state_dict()"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=p))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_vgg16_file_for_vgg19_spec(ext, tmp_path, tv_state):
    # vgg16 and vgg19 agree up to relu3_3; vgg19's conv3_4 (index 16) is a pool in vgg16.
    path = (_save if ext == ".pth" else _save_st)(tmp_path / f"v16{ext}", tv_state("vgg16"))
    w = W.load_weights(FeatureSpec(arch="vgg19", layers=("relu3_3",), weights=path))
    assert "features.14.weight" in w.state
    with pytest.raises(WeightsError, match=r"lack \d+ key\(s\) vgg19 needs up to relu4_4: "
                                           r"features\.16\.weight, features\.16\.bias") as exc:
        W.load_weights(FeatureSpec(arch="vgg19", layers=("relu4_4",), weights=path))
    assert "torchvision vgg19 state dict" in str(exc.value)
    assert "check the arch or the file" in str(exc.value)


def test_vgg19_file_for_vgg16_spec(tmp_path, tv_state):
    path = _save(tmp_path / "v19.pth", tv_state("vgg19"))
    with pytest.raises(WeightsError, match=r"vgg16 needs up to relu4_3: features\.17\.weight"):
        W.load_weights(FeatureSpec(arch="vgg16", layers=("relu4_3",), weights=path))


def test_same_keys_wrong_shapes_name_the_arch(tmp_path, tv_state):
    # A vgg16 state dict renumbered so keys exist where vgg19 expects them, shapes differ.
    v16 = tv_state("vgg16")
    state = {"features.0.weight": v16["features.0.weight"], "features.0.bias": v16["features.0.bias"],
             "features.2.weight": v16["features.5.weight"], "features.2.bias": v16["features.5.bias"]}
    path = _save(tmp_path / "renum.pth", state)
    with pytest.raises(WeightsError, match=r"do not fit vgg19: features\.2\.weight has shape "
                                           r"\(128, 64, 3, 3\), vgg19 needs \(64, 64, 3, 3\).*"
                                           r"not vgg16 vs vgg19"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=path))


def test_wrong_shape(tmp_path, tv_state):
    state = dict(tv_state("vgg19"))
    state["features.2.weight"] = torch.randn(64, 32, 3, 3)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(WeightsError, match=r"do not fit vgg19: features\.2\.weight has shape "
                                           r"\(64, 32, 3, 3\), vgg19 needs \(64, 64, 3, 3\)"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=path))


def test_missing_keys(tmp_path, tv_state):
    state = {k: v for k, v in tv_state("vgg19").items() if not k.startswith("features.5.")}
    path = _save(tmp_path / "missing.pth", state)
    # relu1_2 does not need conv2_1: fine.
    W.load_weights(FeatureSpec(layers=("relu1_2",), weights=path))
    with pytest.raises(WeightsError, match=r"lack 2 key\(s\) vgg19 needs up to relu2_2: "
                                           r"features\.5\.weight, features\.5\.bias"):
        W.load_weights(FeatureSpec(layers=("relu2_2",), weights=path))
    with pytest.raises(WeightsError, match=r"lack \d+ key\(s\).*Accepted: a torchvision vgg19 state dict"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=_save(tmp_path / "e.pth", {"x": torch.ones(1)})))


def test_integer_dtype_in_safetensors(tmp_path, tv_state):
    state = dict(tv_state("vgg19"))
    state["features.0.weight"] = torch.randint(-3, 3, (64, 3, 3, 3), dtype=torch.int32)
    path = _save_st(tmp_path / "int.safetensors", state)
    with pytest.raises(WeightsError, match=r"features\.0\.weight has dtype torch\.int32 "
                                           r"\(accepted: a floating-point tensor\)"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=path))


class _WritesMarker:
    """Unpickling this would create a file: the harmless stand-in for os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_that_executes_code_is_refused(how, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"features.0.weight": _WritesMarker(str(marker)), "features.0.bias": torch.ones(64)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    assert not marker.exists()
    with pytest.raises(WeightsError, match=r"was refused: it holds Python objects beyond tensors"):
        W.load_weights(FeatureSpec(layers=("relu1_2",), weights=str(path)))
    assert not marker.exists()


# -- ImageNet (download mocked) -------------------------------------------------------------


def test_imagenet_download_called_with_torchvision_url(monkeypatch, tv_state):
    calls = []

    def fake(url, **kw):
        calls.append((url, kw))
        return tv_state("vgg19")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    w = W.load_weights(FeatureSpec(layers=("relu2_2",), weights="imagenet"))
    assert len(calls) == 1
    url, kw = calls[0]
    assert url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert kw.get("weights_only") is True
    assert kw.get("map_location") == "cpu"
    assert w.source == "imagenet"
    assert torch.equal(w.state["features.7.weight"], tv_state("vgg19")["features.7.weight"])


def test_imagenet_vgg16_url(monkeypatch, tv_state):
    seen = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kw: seen.append(url) or tv_state("vgg16"))
    W.load_weights(FeatureSpec(arch="vgg16", layers=("relu1_2",), weights="imagenet"))
    assert seen == ["https://download.pytorch.org/models/vgg16-397923af.pth"]


def test_imagenet_download_failure(monkeypatch):
    def fail(url, **kw):
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(WeightsError) as exc:
        W.load_weights(FeatureSpec(weights="imagenet"))
    msg = str(exc.value)
    assert isinstance(exc.value, PerceptualError)
    assert "vgg19-dcbb9e9d.pth" in msg and "ConnectionError" in msg
    assert "weights='random'" in msg
    assert "weights='path/to/vgg19.pth'" in msg and "local" in msg
    assert isinstance(exc.value.__cause__, ConnectionError)


def test_imagenet_download_of_wrong_checkpoint(monkeypatch, tv_state):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: tv_state("vgg16"))
    with pytest.raises(WeightsError, match=r"weights 'imagenet'"):
        W.load_weights(FeatureSpec(weights="imagenet"))
