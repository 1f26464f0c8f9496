"""LPIPS refusals: each bad input is one PerceptualError line that says what to do."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from perceptual_engine import FeatureSpec, PerceptualError, export_onnx
from perceptual_engine import lpips as L
from perceptual_engine.errors import ConfigError, WeightsError
from perceptual_engine.lpips import TorchLPIPS


def _good() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    chans = (64, 128, 256, 512, 512)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(chans)}


def _refused(tmp_path, state, match: str) -> str:
    path = tmp_path / "lin.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=match) as info:
        L.load_linear_weights(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_file_loads(tmp_path):
    path = tmp_path / "lin.pth"
    state = _good()
    torch.save(state, path)
    lin = L.load_linear_weights(path)
    assert all(torch.equal(w, state[f"lin{i}.model.1.weight"]) for i, w in enumerate(lin.weights))
    state["lin0.model.1.weight"][0, 0] += 1.0
    assert L.check_linear_weights(state, "other").sha256 != lin.sha256


def test_missing_key(tmp_path):
    state = _good()
    del state["lin3.model.1.weight"]
    _refused(tmp_path, state, r"missing lin3\.model\.1\.weight.*exactly lin0\.\.lin4")


def test_extra_key(tmp_path):
    state = _good()
    state["lin5.model.1.weight"] = torch.ones(1, 512, 1, 1)
    _refused(tmp_path, state, r"unexpected lin5\.model\.1\.weight")


def test_wrong_shape(tmp_path):
    state = _good()
    state["lin1.model.1.weight"] = torch.ones(1, 192, 1, 1)  # alexnet's second tap
    _refused(tmp_path, state, r"shape \(1, 192, 1, 1\); accepted: \(1, 128, 1, 1\)")


def test_negative(tmp_path):
    state = _good()
    state["lin2.model.1.weight"][0, 5] = -0.25
    _refused(tmp_path, state, r"negative values.*clamp")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(tmp_path, bad):
    state = _good()
    state["lin4.model.1.weight"][0, 7] = bad
    _refused(tmp_path, state, r"NaN or Inf")


def test_weights_whose_head_sum_overflows(tmp_path):
    """Each weight finite and >= 0, yet the head's channel sum overflows float32: every
    total would be Inf. The derived bound is checked, not only each weight."""
    state = _good()
    state["lin2.model.1.weight"][0, 5] = 3e38
    _refused(tmp_path, state, r"reach 3e\+38: the head's sum .* overflows float32")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-lpips-weights",))


def test_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = _good()
    state["lin0.model.1.weight"] = _Exploit()
    _refused(tmp_path, state, r"refused.*could execute code")
    assert not (tmp_path / "pwned-by-lpips-weights").exists()


def test_lpips_not_installed_and_no_path(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the package looks itself up
    with pytest.raises(WeightsError) as info:
        L.load_linear_weights()
    msg = str(info.value)
    assert "pip install perceptual-engine[lpips]" in msg and "--lpips-weights" in msg
    assert "\n" not in msg
    # export fails on it before any network work
    with pytest.raises(WeightsError, match=r"perceptual-engine\[lpips\]"):
        export_onnx(L.default_spec("random"), tmp_path / "m.onnx", graph="lpips")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("spec", [
    FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4"),
                weights="random"),
    FeatureSpec(arch="vgg16", weights="random"),  # the usual four: relu5_3 missing
    FeatureSpec(arch="vgg16", layers=tuple(reversed(L.LAYERS)), weights="random"),
])
def test_spec_other_than_lpips(spec, tmp_path):
    for call in (lambda: export_onnx(spec, tmp_path / "m.onnx", graph="lpips"),
                 lambda: TorchLPIPS(spec)):
        with pytest.raises(ConfigError, match=r"LPIPS needs arch 'vgg16' with layers "
                                              r"relu1_2,relu2_2,relu3_3,relu4_3,relu5_3") as info:
            call()
        assert isinstance(info.value, PerceptualError) and "\n" not in str(info.value)


def test_lpips_options_on_other_graphs(tmp_path):
    with pytest.raises(ConfigError, match="options of graph='lpips'"):
        export_onnx(FeatureSpec(weights="random"), tmp_path / "m.onnx", graph="features",
                    spatial=True)


def test_float16_gradient_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs dtype='float32'"):
        export_onnx(L.default_spec("random"), tmp_path / "m.onnx", graph="lpips", dtype="float16",
                    grad=True)
