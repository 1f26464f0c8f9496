"""DISTS refusals (API and command line), metadata, the command line's distance and demo column."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from perceptual_engine import FeatureSpec, PerceptualError, export_onnx
from perceptual_engine import dists as D
from perceptual_engine.cli.main import main
from perceptual_engine.errors import ConfigError, InputError, WeightsError


def _good() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {k: torch.rand(1, 1475, 1, 1, generator=g) for k in ("alpha", "beta")}


def _refused(tmp_path, state, match: str) -> str:
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=match) as info:
        D.load_weights(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_file_loads_and_hashes(tmp_path):
    path = tmp_path / "w.pt"
    state = _good()
    torch.save(state, path)
    w = D.load_weights(path)
    assert torch.equal(w.alpha, state["alpha"]) and torch.equal(w.beta, state["beta"])
    state["beta"][0, 0] += 1.0
    assert D.check_weights(state, "other").sha256 != w.sha256
    a, b = w.split()
    assert [t.shape[1] for t in a] == list(D.CHANNELS)
    assert abs(float(sum(t.sum() for t in a + b)) - 1.0) < 1e-6


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.__setitem__("alpha", torch.ones(1, 1474, 1, 1)), r"shape \(1, 1474, 1, 1\); accepted: \(1, 1475, 1, 1\)"),
    (lambda s: s["beta"].__setitem__((0, 9), float("nan")), "NaN or Inf"),
    (lambda s: s["beta"].__setitem__((0, 9), float("inf")), "NaN or Inf"),
    (lambda s: s["alpha"].__setitem__((0, 3), -0.5), "negative values"),
    (lambda s: s.pop("beta"), "exactly the keys 'alpha' and 'beta'"),
    (lambda s: s.__setitem__("gamma", torch.ones(1)), "exactly the keys 'alpha' and 'beta'"),
    (lambda s: s.__setitem__("alpha", torch.ones(1, 1475, 1, 1, dtype=torch.int64)), "float tensor"),
    # Each finite and >= 0, but their sum (the normalizer the graph computes) overflows float32.
    (lambda s: s.update(alpha=torch.full((1, 1475, 1, 1), 3e38), beta=torch.full((1, 1475, 1, 1), 3e38)),
     r"sum to 8.85e\+41, beyond float32"),
])
def test_bad_weights(tmp_path, edit, match):
    state = _good()
    edit(state)
    _refused(tmp_path, state, match)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-dists-weights",))


def test_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = _good()
    state["alpha"] = _Exploit()
    _refused(tmp_path, state, r"refused.*could execute code")
    assert not (tmp_path / "pwned-by-dists-weights").exists()


def test_dists_pytorch_not_installed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the package looks itself up
    with pytest.raises(WeightsError) as info:
        D.load_weights()
    msg = str(info.value)
    assert "pip install perceptual-engine[dists]" in msg and "--dists-weights" in msg and "\n" not in msg
    with pytest.raises(WeightsError, match=r"perceptual-engine\[dists\]"):  # before any network work
        export_onnx(D.default_spec("random"), tmp_path / "m.onnx", graph="dists")
    assert not (tmp_path / "m.onnx").exists()
    rc = main(["export", "--graph", "dists", "--weights", "random", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "--dists-weights" in err


@pytest.mark.parametrize("spec", [
    FeatureSpec(arch="vgg16", layers=D.LAYERS, weights="random"),  # max pooling
    FeatureSpec(arch="vgg16", layers=D.LAYERS[:4], weights="random", pooling="l2"),
    FeatureSpec(arch="vgg16", layers=D.LAYERS, weights="random", pooling="l2", input_range="-1,1"),
])
def test_spec_other_than_dists(spec, tmp_path):
    for call in (lambda: export_onnx(spec, tmp_path / "m.onnx", graph="dists"),
                 lambda: D.TorchDISTS(spec, _good_weights())):
        with pytest.raises(ConfigError, match=r"DISTS needs arch 'vgg16'.*pooling 'l2'") as info:
            call()
        assert isinstance(info.value, PerceptualError) and "\n" not in str(info.value)


def _good_weights():
    return D.check_weights(_good(), "test")


def test_dists_weights_on_other_graphs(tmp_path):
    with pytest.raises(ConfigError, match="options? of graph='dists'"):
        export_onnx(FeatureSpec(weights="random"), tmp_path / "m.onnx", graph="features",
                    dists_weights=_good_weights())


def test_float16_gradient_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs dtype='float32'"):
        export_onnx(D.default_spec("random"), tmp_path / "m.onnx", graph="dists", dtype="float16",
                    grad=True, dists_weights=_good_weights())


def test_too_small_images_refused():
    ref = D.TorchDISTS(D.default_spec("random"), _good_weights())
    x = torch.rand(1, 3, 15, 40)
    with pytest.raises(InputError, match="16") as info:
        ref(x, x)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, match", [
    (["export", "--graph", "dists", "--arch", "vgg19", "-o", "m.onnx"], "do not apply to --graph dists"),
    (["export", "--graph", "dists", "--pooling", "max", "-o", "m.onnx"], "do not apply to --graph dists"),
    (["export", "--graph", "dists", "--spatial", "-o", "m.onnx"], "options of --graph lpips"),
    (["export", "--graph", "distance", "--dists-weights", "w.pt", "-o", "m.onnx"], "option of --graph dists"),
    (["distance", "a.png", "b.png", "--dists-weights", "w.pt"], "option of --graph dists"),
    (["distance", "a.png", "b.png", "--graph", "dists", "--style", "relu1_2=1"], "do not apply"),
])
def test_cli_refusals(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((33, 33, 3), 128, np.uint8)).save(tmp_path / name)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_metadata_of_other_graphs_has_no_dists_key(distance_model):
    """Models of other kinds carry no dists key, so files exported before it stay readable."""
    import onnx

    from perceptual_engine.runtime import read_info

    props = {p.key for p in onnx.load(distance_model[0], load_external_data=False).metadata_props}
    assert "perceptual_engine.dists" not in props
    assert read_info(distance_model[0]).dists is None


def test_cli_distance_with_dists_model(dists_models, dists_pkg, tmp_path, capsys):
    """distance --model on a DISTS model: one row per pair with every term, equal to
    DISTS_pytorch on the decoded images."""
    import json

    from perceptual_engine.images import decode

    rng = np.random.default_rng(4)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray((rng.random((35, 41, 3)) * 255).astype(np.uint8)).save(a)
    Image.fromarray((rng.random((35, 41, 3)) * 255).astype(np.uint8)).save(b)
    assert main(["distance", str(a), str(b), "--model", dists_models["fp32"][0], "--format", "json",
                 "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(D.output_names()) <= set(row)
    x, y = (torch.from_numpy(decode(str(p)))[None] for p in (a, b))
    with torch.no_grad():
        want = float(dists_pkg["model"](x, y))
    assert abs(row["total"] - want) <= 1e-5 * want


def test_demo_dists_column(dists_models, distance_model, tmp_path, monkeypatch):
    """The demo's table gains a DISTS column (before LPIPS). Both models are the session's
    fixtures (the demo's exports are replaced), so nothing is exported here."""
    import io

    import perceptual_engine.cli.demo as demo
    from perceptual_engine.datasets.cache import CachedModel

    dpath, dspec, dloss, _ = distance_model
    monkeypatch.setattr(demo, "export_model",
                        lambda spec, *a: (spec, CachedModel(dpath, "d", built=False)))
    monkeypatch.setattr(demo, "dists_model",
                        lambda *a: (CachedModel(dists_models["fp32"][0], "k", built=False), "random"))
    out, err = io.StringIO(), io.StringIO()
    rc = demo.run_demo(dspec, dloss, out_dir=str(tmp_path / "out"), size=40, bench=False,
                       device="cpu", lpips=False, out=out, err=err)
    text = out.getvalue()
    assert rc == 0 and "DISTS_pytorch alpha/beta" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("gaussian", "jpeg"))]
    values = [float(ln.split()[-2]) for ln in lines]  # DISTS, then LPIPS ("-": skipped)
    assert len(values) == 9 and all(np.isfinite(values)) and min(values) > 0
    assert values[:3] == sorted(values[:3])  # more blur, larger DISTS


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
@pytest.mark.parametrize("command", ["export", "distance"])
def test_empty_or_truncated_dists_weights_are_one_line_naming_the_flag(tmp_path, monkeypatch, capsys,
                                                                       content, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(content)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((33, 33, 3), 128, np.uint8)).save(tmp_path / name)
    argv = ([command, "--graph", "dists", "--weights", "random", "--dists-weights", "w.pt"]
            + (["-o", "m.onnx"] if command == "export" else ["a.png", "b.png", "--cache-dir", "c"]))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "w.pt" in err and "Traceback" not in err
    assert "--dists-weights PATH" in err and "--weights PATH" not in err
    assert ("empty" in err) == (content == b"")
