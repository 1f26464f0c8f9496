"""The graph-kind registry (kinds.py) against every path that asks it.

Each kind in kinds.KINDS is exported (or taken from the session's shared models) and
held to what its entry says: inputs, outputs, distance, gradient, matrices, head
metadata, the command line's choices, the memory bound. A new kind without a model
here fails ``test_every_kind_has_a_model``.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from perceptual_engine import Engine, EnginePerceptualLoss, kinds, memory
from perceptual_engine.errors import ConfigError, ModelError
from perceptual_engine.export import metadata
from perceptual_engine.runtime import read_info


@pytest.fixture(scope="module")
def models(vgg_graphs, lpips_models, dists_models):
    """kind -> (path of a model without grad.x or None, path of one with grad.x or None)."""
    return {
        "features": (vgg_graphs["features"], None),
        "distance": (vgg_graphs["distance"], vgg_graphs["distance-grad"]),
        "style": (vgg_graphs["style"], None),
        "target": (None, vgg_graphs["target-grad"]),
        "lpips": (lpips_models["fp16"][0], lpips_models["fp32"][0]),
        "dists": (dists_models["fp16"], dists_models["fp32"][0]),
    }


def test_every_kind_has_a_model(models):
    assert set(models) == set(kinds.KINDS)


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_model_is_what_its_kind_says(name, models):
    kind = kinds.get(name)
    plain, with_grad = models[name]
    for path in (p for p in (plain, with_grad) if p):
        info = read_info(path)
        assert info.graph == name
        images = [n for n in info.input_names if not n.startswith("target.")]
        assert len(images) == kind.images
        assert bool(getattr(info, kind.head)) if kind.head else all(
            getattr(info, k.head) is None for k in kinds.KINDS.values() if k.head)
        if kind.head_outputs is not None:
            assert info.term_names[: len(info.term_names) - info.grad] == kind.head_outputs(
                info.spec.layers, bool(info.spatial))
    assert (with_grad is not None) == kind.grad  # a kind that differentiates has a grad model here
    if with_grad:
        assert read_info(with_grad).grad and "grad.x" in read_info(with_grad).term_names


@pytest.mark.parametrize("name", kinds.names(compares=True))
def test_comparing_kinds_give_a_distance_of_two_images(name, models, rel_err):
    path = models[name][0] or models[name][1]
    engine = Engine(path, "cpu")
    rng = np.random.default_rng(1)
    x, y = (rng.uniform(0, 1, (2, 3, 37, 45)).astype(np.float32) for _ in range(2))
    out = engine.distance(x, y)
    assert out["total"].shape == (2,) and np.isfinite(out["total"]).all()
    assert (engine.distance(x, x)["total"] <= out["total"]).all()


@pytest.mark.parametrize("name", kinds.names(compares=False))
def test_other_kinds_refuse_a_pair(name, models):
    path = models[name][0] or models[name][1]
    engine = Engine(path, "cpu")
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 37, 45)).astype(np.float32)
    with pytest.raises((ModelError, Exception)) as info:
        engine.distance(x, x)
    assert "graph" in str(info.value) or "target" in str(info.value)


@pytest.mark.parametrize("name", kinds.names(grad=True))
def test_kinds_with_a_gradient_train_through_the_engine(name, models):
    if name == "target":
        pytest.skip("a target graph needs a cached target first: tests/test_engine_loss.py")
    loss = EnginePerceptualLoss(models[name][1], device="cpu")
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(0, 1, (1, 3, 37, 45)).astype(np.float32)).requires_grad_(True)
    y = torch.from_numpy(rng.uniform(0, 1, (1, 3, 37, 45)).astype(np.float32))
    out = loss(x, y)
    (out["total"] if isinstance(out, dict) else out).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", kinds.names(compares=True))
def test_matrices_open_exactly_for_matrix_kinds(name, models):
    from perceptual_engine.runtime.matrix import Embedder

    engine = Engine(models[name][0] or models[name][1], "cpu")
    if kinds.get(name).matrix:
        Embedder(engine)
    else:
        with pytest.raises(ModelError, match="distance matrices need"):
            Embedder(engine)


def test_heads_share_one_module_shape():
    for kind in kinds.KINDS.values():
        if kind.head is None:
            assert kind.module() is None and kind.weights_flag is None
            continue
        module = kind.module()
        for name in ("default_spec", "check_spec", "spec_from_flags", "resolve_weights", "build"):
            assert callable(getattr(module, name, None)), (kind.name, name)
        assert kind.head in metadata.FIELDS, kind.name
        kind.module().check_spec(module.default_spec("random"))
        assert kind.weights_help, kind.name


def test_the_command_line_offers_what_the_registry_says():
    from perceptual_engine.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    def graph_choices(command):
        return tuple(next(a for a in subs[command]._actions if a.dest == "graph").choices)

    assert graph_choices("export") == kinds.names()
    assert graph_choices("distance") == kinds.names(compares=True)
    assert graph_choices("matrix") == kinds.names(matrix=True)
    flags = {s for a in subs["export"]._actions for s in a.option_strings}
    for kind in kinds.KINDS.values():
        if kind.head:
            assert kind.weights_flag in flags, kind.name


def test_metadata_and_memory_cover_every_kind():
    assert metadata.GRAPH_KINDS == tuple(kinds.KINDS)
    for name, kind in kinds.KINDS.items():
        assert memory.IMAGES_PER_SAMPLE[name] == kind.images
        assert memory.TAP[name] == kind.tap_factor


def test_an_unknown_kind_is_refused_with_the_accepted_ones():
    with pytest.raises(ConfigError, match="accepted: features, distance, style, target, lpips, dists"):
        kinds.get("ssim")
