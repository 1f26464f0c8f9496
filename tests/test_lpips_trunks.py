"""LPIPS on AlexNet and SqueezeNet 1.1 against the lpips package's own LPIPS(net=...).

The trunks are the package's random ones (pnet_rand=True), copied into torchvision-format
files for our specs; one float32 export per net (tests/conftest.py ``lpips_trunks``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from perceptual_engine import Engine, lpips as L
from perceptual_engine.cli.main import main
from perceptual_engine.errors import ConfigError, InputError, WrongNetError, WrongTrunkError
from perceptual_engine.lpips import TorchLPIPS
from perceptual_engine.reference import TorchFeatures
from perceptual_engine.runtime import read_info
from perceptual_engine.spec import FeatureSpec
from perceptual_engine.weights import load_weights

NETS = ("alex", "squeeze")
TOL = 1e-5


def _pair(seed: int, n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, 3, h, w, generator=g) * 2 - 1 for _ in range(2))


def _package(entry, spatial: bool = False):
    if not spatial:
        return entry["model"]
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = lpips.LPIPS(net=L.net_of(entry["spec"]).name, pnet_rand=True, spatial=True,
                         verbose=False).eval()
    sp.load_state_dict(entry["model"].state_dict())
    return sp


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("net", NETS)
def test_parity_with_the_lpips_package(net, lpips_trunks):
    entry = lpips_trunks[net]
    x, y = _pair(5, 2, 67, 83)  # odd sizes: AlexNet's stride-4 conv and 3x3/2 pools floor them
    with torch.no_grad():
        total, per = entry["model"](x, y, retPerLayer=True)
        spatial = _package(entry, spatial=True)(x, y)
    want = {f"lpips.{n}": p.flatten() for n, p in zip(entry["spec"].layers, per)}
    want["total"], want["spatial"] = total.flatten(), spatial
    assert len(per) == len(L.NETS[net].layers)
    with torch.no_grad():
        ref = TorchLPIPS(entry["spec"], spatial=True)(x, y)
    got = Engine(entry["path"]).distance(x.numpy(), y.numpy())
    for name, value in want.items():
        assert _rel(ref[name], value) < TOL, (net, name, "reference")
        assert _rel(got[name], value) < TOL, (net, name, "onnx")


@pytest.mark.parametrize("net", NETS)
def test_gradient_matches_float64_autograd(net, lpips_trunks):
    """lpips_and_grad (the VJPs an export with grad=True traces) against the lpips
    package's autograd in float64."""
    entry = lpips_trunks[net]
    x, y = _pair(2, 1, 47, 53)
    features = TorchFeatures(entry["spec"])
    lin = L.load_linear_weights(net=net)
    with torch.no_grad():
        fy = features.extract(y)
        _, gx = L.lpips_and_grad(features, x, fy, lin)
    model = _package(entry).double()
    x64 = x.double().requires_grad_()
    model(x64, y.double()).sum().backward()
    entry["model"].float()
    assert _rel(gx, x64.grad) < 1e-4


@pytest.mark.parametrize("net,side", [("alex", 31), ("squeeze", 17)])
def test_min_size_is_enforced(net, side, lpips_trunks):
    spec = lpips_trunks[net]["spec"]
    assert spec.min_size == side
    x, y = _pair(0, 1, side, side)
    assert np.isfinite(Engine(lpips_trunks[net]["path"]).distance(x.numpy(), y.numpy())["total"]).all()
    small, _ = _pair(0, 1, side - 1, side + 7)
    with pytest.raises(InputError, match=rf"too small for {spec.deepest}.*>= {side}"):
        TorchLPIPS(spec)(small, small)
    with pytest.raises(InputError, match=rf">= {side}"):
        Engine(lpips_trunks[net]["path"]).distance(small.numpy(), small.numpy())


@pytest.mark.parametrize("net", NETS)
def test_matrix_and_metadata(net, lpips_trunks):
    entry = lpips_trunks[net]
    assert read_info(entry["path"]).lpips["net"] == net
    x, _ = _pair(3, 3, 41, 45)
    engine = Engine(entry["path"])
    m = engine.matrix(x.numpy())
    d = engine.distance(x[[0, 1]].numpy(), x[[1, 2]].numpy())
    assert set(m) == set(d) - {"spatial"}
    np.testing.assert_allclose([m["total"][0, 1], m["total"][1, 2]], d["total"], rtol=1e-4)


def test_older_lpips_metadata_reads_as_vgg():
    from perceptual_engine.export.metadata_fields import _head_field

    parse = _head_field("lpips")
    old = '{"spatial": false, "weights_sha256": "%s", "weights_source": "vgg.pth"}' % ("0" * 64)
    assert parse(old)["net"] == "vgg"
    with pytest.raises(Exception, match="lpips.net is 'resnet', not one of alex, squeeze, vgg"):
        parse(old[:-1] + ', "net": "resnet"}')


def test_recorded_net_must_be_the_specs(lpips_trunks):
    import dataclasses

    from perceptual_engine.export.metadata_fields import Invalid
    from perceptual_engine.export.metadata_rules import GRAPH_RULES

    info = read_info(lpips_trunks["alex"]["path"])
    GRAPH_RULES["lpips"](info)
    for net in ("vgg", "squeeze"):
        with pytest.raises(Invalid, match=rf"lpips.net is '{net}', but .*spec \(arch 'alexnet'\) implies 'alex'"):
            GRAPH_RULES["lpips"](dataclasses.replace(info, lpips={**info.lpips, "net": net}))


def test_metric_net_type(lpips_trunks):
    metrics = pytest.importorskip("perceptual_engine.metrics")
    entry = lpips_trunks["alex"]
    x, y = _pair(4, 2, 35, 39)
    metric = metrics.LPIPS(entry["path"], net_type="alex")
    metric.update(x, y)
    want = Engine(entry["path"]).distance(x.numpy(), y.numpy())["total"].mean()
    assert metric.net_type == "alex" and float(metric.compute()) == pytest.approx(float(want), rel=1e-5)
    assert metrics.LPIPS(entry["path"]).net_type == "alex"
    with pytest.raises(ConfigError, match="net 'alex', not net_type='vgg'"):
        metrics.LPIPS(entry["path"], net_type="vgg")
    with pytest.raises(ConfigError, match="LPIPS net 'resnet' is not accepted; accepted: alex, squeeze, vgg"):
        metrics.LPIPS(entry["path"], net_type="resnet")


def test_specs_and_weights_of_each_net(lpips_trunks, tmp_path):
    for net in L.NETS:
        spec = L.default_spec("random", net=net)
        assert spec.arch == L.NETS[net].arch and spec.layers == L.NETS[net].layers
        assert L.load_linear_weights(net=net).layers == spec.layers
    # A trunk file of another net: the error names the trunk it fits.
    with pytest.raises(WrongTrunkError, match="torchvision alexnet state dict: use arch 'alexnet'"):
        load_weights(FeatureSpec(arch="squeezenet1_1", weights=lpips_trunks["alex"]["weights"]))
    # Linear weights of another net: named too.
    with pytest.raises(WrongNetError, match=r"are for net 'vgg' \(VGG16\), not net 'squeeze' \(SqueezeNet 1.1\)"):
        L.load_linear_weights(L.default_weights_path("vgg"), net="squeeze")
    with pytest.raises(ConfigError, match="LPIPS needs arch 'vgg16' with layers relu1_2,.*got arch 'vgg19'"):
        L.check_spec(FeatureSpec(arch="vgg19", weights="random"))


def _cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["export", "--graph", "distance", "--lpips-net", "alex", "--weights", "random"],
     "--lpips-net is an option of --graph lpips; add --graph lpips, or drop it."),
    (["export", "--lpips-net", "squeeze", "--weights", "random"],
     "--lpips-net is an option of --graph lpips"),
    (["export", "--graph", "lpips", "--lpips-net", "alex", "--arch", "vgg16", "--weights", "random"],
     "--lpips-net alex runs arch alexnet, not --arch vgg16"),
    (["export", "--graph", "lpips", "--lpips-net", "alex", "--pooling", "avg", "--weights", "random"],
     "pooling 'avg' is not offered by alexnet"),
])
def test_cli_refusals(argv, match, capsys, tmp_path):
    code, err = _cli(argv + ["-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_unknown_trunk_lists_them(capsys, tmp_path):
    code, err = _cli(["export", "--arch", "resnet50", "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "'vgg16', 'vgg19', 'alexnet', 'squeezenet1_1'" in err


def test_cli_weights_of_another_trunk_or_net(lpips_trunks, capsys, tmp_path):
    out = str(tmp_path / "m.onnx")
    code, err = _cli(["export", "--graph", "lpips", "--lpips-net", "alex", "--weights",
                      lpips_trunks["squeeze"]["weights"], "-o", out], capsys)
    assert code == 2 and "torchvision squeezenet1_1 state dict: use arch 'squeezenet1_1'" in err
    code, err = _cli(["export", "--graph", "lpips", "--lpips-net", "squeeze", "--weights", "random",
                      "--lpips-weights", L.default_weights_path("alex"), "-o", out], capsys)
    assert code == 2 and "are for net 'alex' (AlexNet), not net 'squeeze'" in err and err.count("\n") == 1


def test_cli_distance_on_a_squeeze_model(lpips_trunks, capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    path = lpips_trunks["squeeze"]["path"]
    code = main(["distance", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", path,
                 "--format", "csv"])
    out = capsys.readouterr().out
    assert code == 0 and "lpips.fire9" in out and "total" in out
    code, err = _cli(["distance", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", path,
                      "--lpips-net", "squeeze"], capsys)
    assert code == 2 and "--lpips-net" in err
