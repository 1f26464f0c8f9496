"""perceptual_engine.metrics against torchmetrics' own LPIPS and DISTS metrics."""
from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("torchmetrics")

from perceptual_engine import metrics as M  # noqa: E402
from perceptual_engine.errors import ConfigError, ModelError  # noqa: E402


def batches(lo: float, seed: int):
    """Three batches of (x, y), odd sizes, the last of another size."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 37, 41), (3, 3, 37, 41), (1, 3, 33, 45)]
    return [tuple(lo + (1 - lo) * torch.rand(s, generator=g) for _ in "xy") for s in shapes]


def _trunk(weights_file: str):
    """torchvision VGG16 ``features`` holding a torchvision-format state dict."""
    import torchvision

    feats = torchvision.models.vgg16(weights=None).features.eval()
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    feats.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    return feats


@pytest.fixture(scope="module")
def tm_lpips(lpips_pkg, monkeypatch_module):
    """torchmetrics' LPIPS (net_type="vgg") on the lpips fixture's trunk: its ImageNet
    download is patched out (``_get_tv_model_features``); its own linear weights load."""
    from torchmetrics.functional.image import lpips as tml
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    trunk = _trunk(lpips_pkg["weights"])
    monkeypatch_module.setattr(tml, "_get_tv_model_features", lambda net, pretrained=False: copy.deepcopy(trunk))
    return LearnedPerceptualImagePatchSimilarity


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_lpips_equals_torchmetrics(lpips_models, tm_lpips):
    import os

    from perceptual_engine import lpips as L
    from torchmetrics.functional.image import lpips as tml

    # Same linear weights: torchmetrics' bundled vgg.pth and the lpips package's.
    raw = torch.load(os.path.join(os.path.dirname(tml.__file__), "lpips_models", "vgg.pth"),
                     map_location="cpu", weights_only=True)
    assert all(torch.equal(raw[f"lin{i}.model.1.weight"], w) for i, w in enumerate(L.load_linear_weights().weights))

    ours = M.LPIPS(lpips_models["fp32"][0])  # inputs in [-1, 1]: normalize=False
    theirs = tm_lpips(net_type="vgg")
    for x, y in batches(-1.0, 1):
        ours.update(x, y)
        theirs.update(x, y)
    got, want = ours.compute(), theirs.compute()
    assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want))
    ours.reset()
    assert int(ours.count) == 0 and float(ours.score_sum) == 0.0


def test_dists_equals_torchmetrics(dists_models, dists_pkg, monkeypatch):
    from torchmetrics.functional.image import dists as tmd
    from torchmetrics.image.dists import DeepImageStructureAndTextureSimilarity

    trunk = _trunk(dists_pkg["weights"])
    monkeypatch.setattr(tmd, "vgg16", lambda *a, **k: types.SimpleNamespace(features=copy.deepcopy(trunk)))
    ours = M.DISTS(dists_models["fp32"][0], reduction="sum")
    theirs = DeepImageStructureAndTextureSimilarity(reduction="sum")
    for x, y in batches(0.0, 2):
        ours.update(x, y)
        theirs.update(x, y)
    got, want = float(ours.compute()), float(theirs.compute())
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_perceptual_mean_and_merged_state(distance_model):
    """The mean of TorchPerceptualLoss totals; two metrics' states merged (as DDP's sum
    reduction does) equal one metric over every batch."""
    from perceptual_engine import TorchPerceptualLoss

    path, spec, loss, _ = distance_model
    ref = TorchPerceptualLoss(spec, loss)
    data = batches(0.0, 3)
    one, a, b = M.Perceptual(path), M.Perceptual(path), M.Perceptual(path)
    totals = []
    for i, (x, y) in enumerate(data):
        one.update(x, y)
        (a if i % 2 else b).update(x, y)
        with torch.no_grad():
            totals.append(ref(x, y)["total"])
    want = float(torch.cat(totals).double().mean())
    assert abs(float(one.compute()) - want) <= 1e-4 * abs(want)
    assert set(one._reductions) == {"perceptual_sum", "perceptual_count", "perceptual_model"}
    a.merge_state(b)
    assert abs(float(a.compute()) - float(one.compute())) <= 1e-6 * abs(want)
    c = one.clone()  # a deep copy reopens its engine on first use
    c.update(*data[0])
    assert int(c.count) == int(one.count) + 2


def test_collection_never_merges_different_metrics(distance_model, vgg_graphs, lpips_models, dists_models):
    """In a real MetricCollection (compute groups on), a first batch of identical pairs
    gives every metric equal-looking sums (0) and counts: LPIPS, DISTS and two Perceptual
    metrics on different models must still each report their own value."""
    from torchmetrics import MetricCollection

    def make():
        return {"lpips": M.LPIPS(lpips_models["fp32"][0]), "dists": M.DISTS(dists_models["fp32"][0]),
                "perc": M.Perceptual(distance_model[0]), "perc2": M.Perceptual(vgg_graphs["distance-grad"])}

    g = torch.Generator().manual_seed(27)
    same = torch.rand(2, 3, 36, 38, generator=g)
    x, y = (torch.rand(2, 3, 36, 38, generator=g) for _ in "xy")
    coll, alone = MetricCollection(make()), make()
    coll.update(same, same.clone())
    coll.update(x, y)
    got = coll.compute()
    for name, metric in alone.items():
        metric.update(x, y)
        want = float(metric.compute()) * 2 / 4  # the identical pairs add 0 to the sum, 2 to the count
        assert abs(float(got[name]) - want) <= 1e-5 * abs(want), (name, float(got[name]), want)
    assert len({round(float(v), 6) for v in got.values()}) == 4
    assert all(len(group) == 1 for group in coll.compute_groups.values()), coll.compute_groups


def test_metric_refuses_wrong_model_and_options(distance_model, lpips_models):
    with pytest.raises(ModelError, match="needs one exported with graph='dists'"):
        M.DISTS(distance_model[0])
    with pytest.raises(ConfigError, match="normalize=True means"):
        M.LPIPS(lpips_models["fp32"][0], normalize=True)
    with pytest.raises(ConfigError, match="reduction 'none'"):
        M.Perceptual(distance_model[0], reduction="none")
    with pytest.raises(ConfigError, match="model=PATH"):
        M.Perceptual()


def test_optional_packages_imported_lazily():
    """import perceptual_engine (and dists, the CLI) pulls neither torchmetrics nor
    DISTS_pytorch; perceptual_engine.metrics without torchmetrics names the extra."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import perceptual_engine, perceptual_engine.dists, perceptual_engine.cli.main\n"
        "assert 'torchmetrics' not in sys.modules and 'DISTS_pytorch' not in sys.modules\n"
        "sys.modules['torchmetrics'] = None\n"
        "try:\n"
        "    import perceptual_engine.metrics\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert 'pip install perceptual-engine[torchmetrics]' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('imported without torchmetrics')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
