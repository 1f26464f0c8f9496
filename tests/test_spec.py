"""FeatureSpec and LossConfig: validation on construction, defaults, round trips."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from perceptual_engine import FeatureSpec, LossConfig, PerceptualError
from perceptual_engine.errors import ConfigError


# -- FeatureSpec ----------------------------------------------------------------------------


def test_defaults_per_arch():
    s19 = FeatureSpec()
    assert s19.arch == "vgg19"
    assert s19.layers == ("relu1_2", "relu2_2", "relu3_4", "relu4_4")
    assert s19.weights == "imagenet" and s19.seed == 0
    assert s19.input_range == "0,1" and s19.pooling == "max"
    assert s19.deepest == "relu4_4" and s19.min_size == 8
    s16 = FeatureSpec(arch="vgg16")
    assert s16.layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
    assert s16.deepest == "relu4_3" and s16.min_size == 8


def test_layers_normalized_to_tuple_in_given_order():
    assert FeatureSpec(layers=["relu2_2", "relu1_2"]).layers == ("relu2_2", "relu1_2")
    assert FeatureSpec(layers="relu3_1").layers == ("relu3_1",)
    spec = FeatureSpec(layers=("relu2_2", "conv1_1"))
    assert spec.deepest == "relu2_2" and spec.min_size == 2
    assert FeatureSpec(layers=("pool2",)).min_size == 4


def test_frozen():
    spec = FeatureSpec(weights="random")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.arch = "vgg16"  # type: ignore[misc]
    loss = LossConfig(content={"relu2_2": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.gram = "hw"  # type: ignore[misc]
    # The weight maps are read-only views too: a config cannot change after validation.
    with pytest.raises(TypeError):
        loss.content["relu2_2"] = -1.0  # type: ignore[index]


def test_frozen_configs_are_hashable():
    # Frozen dataclasses are expected to be hashable (dict keys, lru_cache arguments).
    assert hash(FeatureSpec(weights="random")) == hash(FeatureSpec(weights="random"))
    a = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 2.0})
    b = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 2.0})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, LossConfig(content={"relu2_2": 1.0}, gram="hw")}) == 2


def test_loss_config_copies_the_callers_mapping():
    weights = {"relu2_2": 1.0}
    loss = LossConfig(content=weights)
    weights["relu2_2"] = -5.0
    assert loss.content["relu2_2"] == 1.0


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(arch="vgg11"), r"arch 'vgg11' is not accepted; accepted: 'vgg16', 'vgg19'"),
    (dict(arch="VGG19"), r"accepted: 'vgg16', 'vgg19'"),
    (dict(layers=()), r"layers is empty; name at least one layer"),
    (dict(layers=("relu1_2", "relu9_9")), r"unknown layer 'relu9_9' for vgg19; accepted: conv1_1"),
    (dict(layers=("3",)), r"named, not indexed"),
    (dict(arch="vgg16", layers=("relu3_4",)), r"unknown layer 'relu3_4' for vgg16; accepted:"),
    (dict(layers=("relu1_2", "relu1_2")), r"name a layer twice"),
    (dict(weights=""), r"weights '' is not accepted; accepted: 'imagenet', 'random'"),
    (dict(weights=None), r"weights None is not accepted; accepted: 'imagenet', 'random'"),
    (dict(weights="ImageNet"), r"neither 'imagenet', 'random' nor a \.pth/\.pt/\.safetensors"),
    (dict(weights="model.onnx"), r"neither 'imagenet', 'random' nor a \.pth/\.pt/\.safetensors"),
    (dict(weights="random", seed="1"), r"seed '1' is not an int"),
    (dict(weights="random", seed=1.5), r"seed 1.5 is not an int"),
    (dict(weights="random", seed=True), r"seed True is not an int"),
    (dict(input_range="0,255"), r"input_range '0,255' is not accepted; accepted: '0,1', '-1,1'"),
    (dict(input_range="[0, 1]"), r"accepted: '0,1', '-1,1'"),
    (dict(pooling="min"), r"pooling 'min' is not accepted; accepted: 'max', 'avg'"),
])
def test_invalid_feature_spec(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as exc:
        FeatureSpec(**kwargs)
    assert isinstance(exc.value, PerceptualError)
    assert isinstance(exc.value, ValueError)


def test_weights_path_accepted_and_pathlike_made_str(tmp_path):
    p = tmp_path / "vgg.safetensors"
    spec = FeatureSpec(weights=p)  # type: ignore[arg-type]
    assert spec.weights == str(p) and isinstance(spec.weights, str)
    for name in ("a.pth", "a.pt", "dir/a.safetensors"):
        assert FeatureSpec(weights=name).weights == name
    # Validation does not read the file: a missing file fails when weights are loaded.
    FeatureSpec(weights=str(pathlib.Path(tmp_path, "missing.pth")))


@pytest.mark.parametrize("spec", [
    FeatureSpec(),
    FeatureSpec(arch="vgg16", layers=("conv2_2", "relu1_1"), weights="random", seed=42,
                input_range="-1,1", pooling="avg"),
    FeatureSpec(weights="some/file.safetensors", layers=("pool3",)),
])
def test_feature_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert d["layers"] == list(spec.layers)
    again = FeatureSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec
    assert again.key() == spec.key() and len(spec.key()) == 16


def test_from_dict_ignores_unknown_keys_and_fills_defaults():
    spec = FeatureSpec.from_dict({"arch": "vgg16", "future_field": 1, "layers": None})
    assert spec == FeatureSpec(arch="vgg16")


def test_key_differs_with_any_field():
    base = FeatureSpec(weights="random")
    others = [dataclasses.replace(base, seed=1), dataclasses.replace(base, pooling="avg"),
              dataclasses.replace(base, input_range="-1,1"), FeatureSpec(arch="vgg16", weights="random"),
              dataclasses.replace(base, layers=("relu1_2",))]
    keys = {base.key()} | {o.key() for o in others}
    assert len(keys) == 1 + len(others)


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="pooling"):
        dataclasses.replace(FeatureSpec(), pooling="median")


# -- LossConfig -----------------------------------------------------------------------------


def test_loss_defaults_and_output_names():
    loss = LossConfig(content={"relu2_2": 1}, style={"relu1_2": 0.5, "relu3_4": 2})
    assert loss.gram == "chw"
    assert dict(loss.content) == {"relu2_2": 1.0} and isinstance(loss.content["relu2_2"], float)
    assert loss.output_names() == ("content.relu2_2", "style.relu1_2", "style.relu3_4", "total")
    assert LossConfig(style={"relu1_2": 1.0}).output_names() == ("style.relu1_2", "total")


def test_default_for_spec_is_unit_content_on_every_layer():
    spec = FeatureSpec(arch="vgg16")
    loss = LossConfig.default_for(spec)
    assert dict(loss.content) == {n: 1.0 for n in spec.layers}
    assert dict(loss.style) == {}


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(), r"LossConfig has no term; give content="),
    (dict(content={}, style={}), r"LossConfig has no term"),
    (dict(content={"relu2_2": 1.0}, gram="gatys"),
     r"gram 'gatys' is not accepted; accepted: 'chw', 'hw', 'none'"),
    (dict(content={"relu2_2": 1.0}, gram=None), r"accepted: 'chw', 'hw', 'none'"),
    (dict(content={"relu2_2": -1.0}), r"content weight of 'relu2_2' is -1.0; accepted: a finite number >= 0"),
    (dict(style={"relu2_2": float("nan")}), r"style weight of 'relu2_2' is nan; accepted: a finite"),
    (dict(style={"relu2_2": float("inf")}), r"style weight of 'relu2_2' is inf; accepted: a finite"),
    (dict(content={"relu2_2": "1"}), r"content weight of 'relu2_2' is '1'; accepted: a finite number"),
    (dict(content={"relu2_2": True}), r"content weight of 'relu2_2' is True; accepted"),
    (dict(content=["relu2_2"]), r"content must map layer names to weights, e\.g\. \{'relu2_2': 1\.0\}"),
    (dict(style="relu2_2"), r"style must map layer names to weights"),
])
def test_invalid_loss_config(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LossConfig(**kwargs)


def test_zero_weight_is_allowed():
    loss = LossConfig(content={"relu2_2": 0.0}, style={"relu1_2": 1.0})
    assert loss.content["relu2_2"] == 0.0


def test_check_against():
    spec = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
    LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0}).check_against(spec)
    with pytest.raises(ConfigError, match=r"content names layer\(s\) \['relu3_4'\] that the FeatureSpec "
                                          r"does not extract; extracted: \['relu1_2', 'relu2_2'\]"):
        LossConfig(content={"relu3_4": 1.0}).check_against(spec)
    with pytest.raises(ConfigError, match=r"style names layer\(s\) \['relu4_4', 'conv1_1'\]"):
        LossConfig(content={"relu1_2": 1.0},
                   style={"relu4_4": 1.0, "relu1_2": 1.0, "conv1_1": 1.0}).check_against(spec)


@pytest.mark.parametrize("loss", [
    LossConfig(content={"relu2_2": 1.0}),
    LossConfig(content={"relu2_2": 0.25}, style={"relu1_2": 3.0, "relu4_4": 1e-3}, gram="none"),
    LossConfig(style={"relu3_4": 2.0}, gram="hw"),
])
def test_loss_dict_round_trip(loss):
    again = LossConfig.from_dict(json.loads(json.dumps(loss.to_dict())))
    assert again.to_dict() == loss.to_dict()
    assert again == loss
    assert again.output_names() == loss.output_names()
