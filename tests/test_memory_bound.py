"""The memory estimate is an upper bound of the measured peak, for every graph kind and
loss shape, with and without a gradient.

Each configuration runs one Engine call in its own process (scripts/memory_probe.py's
child mode: the peak RSS the call adds to a process holding the model, inputs
included) on a 256² image (pair), large enough that the call's memory is several
times FIXED: the bound is not met by the constant alone. Models: conftest's shared
exports where one fits, shallow VGG19 models (to relu2_2, where the peak is: the
first block) exported here once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from perceptual_engine import FeatureSpec, LossConfig, export_onnx, memory
from perceptual_engine.runtime import read_info

SIDE = 256
PROBE = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "memory_probe.py")
SHALLOW = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=1)
CONTENT = LossConfig(content={"relu2_2": 1.0})
STYLED = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0})


@pytest.fixture(scope="module")
def bound_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory-bound")
    out = {}
    for key, graph, loss, grad in (("distance content", "distance", CONTENT, False),
                                   ("distance content grad", "distance", CONTENT, True),
                                   ("distance style grad", "distance", STYLED, True),
                                   ("target", "target", STYLED, False)):
        path = str(folder / (key.replace(" ", "-") + ".onnx"))
        export_onnx(loss.used_spec(SHALLOW), path, graph=graph, loss=loss, grad=grad)
        out[key] = path
    return out


CONFIGS = ["features", "distance content", "distance content grad", "distance style",
           "distance style grad", "target", "target grad", "lpips", "lpips grad"]


def _model(key, request, bound_models) -> str:
    if key in bound_models:
        return bound_models[key]
    if key == "features":
        return request.getfixturevalue("features_model")[0]
    if key == "distance style":  # content and style (chw), to relu3_1
        return request.getfixturevalue("distance_model")[0]
    if key == "target grad":
        return request.getfixturevalue("target_grad_cache")[2]
    lp = request.getfixturevalue("lpips_models")  # fp32: spatial and grad; fp16: neither
    return lp["fp32" if key == "lpips grad" else "fp16"][0]


def test_every_kind_is_configured():
    """features graphs have no gradient output; every other kind is measured both ways."""
    kinds = {c.replace(" grad", "").split()[0] for c in CONFIGS}
    assert kinds == {"features", "distance", "target", "lpips"}
    for kind in ("distance content", "distance style", "target", "lpips"):
        assert kind in CONFIGS and kind + " grad" in CONFIGS


@pytest.mark.parametrize("key", CONFIGS)
def test_the_estimate_bounds_the_measured_peak(key, request, bound_models):
    path = _model(key, request, bound_models)
    info = read_info(path)
    assert info.grad == key.endswith("grad") and (bool(info.loss and info.loss.style)
                                                 == ("style" in key or key.startswith("target")))
    pair = memory.IMAGES_PER_SAMPLE[info.graph] == 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, PROBE, "--child", path, "1" if pair else "0", str(SIDE)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["call_bytes"]
    taps = None if info.loss is None else tuple(dict.fromkeys((*info.loss.content, *info.loss.style)))
    est = memory.estimate(info.spec, info.graph, 1, SIDE, SIDE, dtype=info.dtype, grad=info.grad,
                          taps=taps, grams=tuple(info.loss.style) if info.loss else ())
    assert measured > 2 * memory.FIXED, f"{measured / 2**20:.0f} MiB: too small to mean anything"
    assert est.total >= measured, (f"{key}: measured {measured / 2**20:.0f} MiB > estimate "
                                   f"{est.total / 2**20:.0f} MiB")
