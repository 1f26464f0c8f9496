"""Triton model repository: config.pbtxt parsed with Triton's own schema, checked
against the ONNX graph for every graph kind; atomic, no clobbering, CLI."""
from __future__ import annotations

import os
import sys

import onnx
import pytest

from perceptual_engine.errors import ConfigError, ExportError
from perceptual_engine.export.triton import check_config, graph_tensors, write_triton_repo

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

# Every graph kind: conftest's session-scoped exports, and a target graph with grad.x here.
GRAPH_FIXTURES = ["features_model", "distance_model", "style_model", "target_model"]
UNBATCHED = ("style_model", "target_model")  # cached targets are (1, ...) inputs


@pytest.fixture(scope="module")
def target_model(tmp_path_factory):
    from perceptual_engine import FeatureSpec, LossConfig, export_onnx

    spec = FeatureSpec(arch="vgg19", layers=("relu1_2", "relu2_2"), weights="random", seed=3)
    path = str(tmp_path_factory.mktemp("target") / "target.onnx")
    loss = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0})
    return path, export_onnx(spec, path, graph="target", loss=loss, grad=True)
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16}


def _parse(path: str):
    config = mc.ModelConfig()
    with open(path, encoding="utf-8") as fh:
        text_format.Parse(fh.read(), config)
    return config


@pytest.mark.parametrize("fixture", GRAPH_FIXTURES)
def test_config_parses_and_agrees_with_the_graph(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)[0]
    r = write_triton_repo(model, tmp_path / "repo", "m")
    assert r.checked and r.note == ""
    assert sorted(os.listdir(tmp_path / "repo")) == ["m"]  # no staging folder left
    assert open(r.model, "rb").read() == open(model, "rb").read()
    config = _parse(r.config)
    graph = onnx.load(model, load_external_data=False).graph
    assert config.platform == "onnxruntime_onnx" and config.name == "m"
    # The style graph's target Grams are (1, C, C): Triton must not batch it.
    batched = all(v.type.tensor_type.shape.dim[0].dim_param for v in (*graph.input, *graph.output))
    assert (config.max_batch_size > 0) == batched == (fixture not in UNBATCHED)
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [d.name for d in declared] == [v.name for v in values]
        for d, v in zip(declared, values):
            shape = v.type.tensor_type.shape.dim
            assert d.data_type == ONNX_TO_TRITON[v.type.tensor_type.elem_type], d.name
            if batched and len(shape) == 1:  # per-sample value: dims [1] reshaped to []
                assert list(d.dims) == [1] and d.HasField("reshape") and list(d.reshape.shape) == []
                continue
            want = [s.dim_value if s.HasField("dim_value") else -1 for s in shape[int(batched):]]
            assert list(d.dims) == want, d.name
    if batched:
        assert config.HasField("dynamic_batching")
        assert max(config.dynamic_batching.preferred_batch_size) == config.max_batch_size
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    p = dict(trt.parameters)
    # FP32 for gradient graphs until a float16 parity run on TensorRT passes (the target has grad.x)
    assert p["precision_mode"] == ("FP32" if fixture == "target_model" else "FP16")
    assert p["trt_engine_cache_enable"] == "1"
    assert int(p["max_workspace_size_bytes"]) > 0 and p["trt_engine_cache_path"]
    # Every input with a dynamic axis has a profile shape of its own rank.
    dynamic = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.input
               if any(d.dim_param for d in v.type.tensor_type.shape.dim)}
    for key in ("min", "opt", "max"):
        shapes = dict(s.split(":") for s in p[f"trt_profile_{key}_shapes"].split(","))
        assert {k: len(v.split("x")) for k, v in shapes.items()} == dynamic
    (warm,) = config.model_warmup
    assert set(warm.inputs) == {v.name for v in graph.input}
    assert all(w.random_data for w in warm.inputs.values())
    # The warmup request runs on ONNX Runtime CPU here: shapes that fit each other.
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {k: rng.random(([1] if batched else []) + list(w.dims), dtype=np.float32)
             for k, w in warm.inputs.items()}
    if "x" in feeds:  # the warmup size is the profile's opt side; keep the CPU run small
        feeds = {k: v[..., : max(1, v.shape[-2] // 8), : max(1, v.shape[-1] // 8)]
                 if v.ndim == 4 else v for k, v in feeds.items()}
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)


def test_check_fails_on_a_config_that_disagrees(distance_model, tmp_path):
    r = write_triton_repo(distance_model[0], tmp_path, "m")
    inputs, outputs = graph_tensors(distance_model[0])
    text = open(r.config).read()
    with pytest.raises(ExportError, match="TYPE_FP16 vs the graph's TYPE_FP32"):
        check_config(text.replace("TYPE_FP32", "TYPE_FP16", 1), inputs, outputs)
    with pytest.raises(ExportError, match="rank"):
        check_config(text.replace("dims: [ 3, -1, -1 ]", "dims: [ 3, -1 ]", 1), inputs, outputs)
    with pytest.raises(ExportError, match="does not parse"):
        check_config(text.replace("max_batch_size", "max_batch"), inputs, outputs)


def test_refuses_to_clobber_another_model(distance_model, features_model, tmp_path):
    r = write_triton_repo(distance_model[0], tmp_path, "m")
    before = open(r.config).read()
    again = write_triton_repo(distance_model[0], tmp_path, "m", max_batch_size=4)  # same model
    assert "max_batch_size: 4" in open(again.config).read()
    with pytest.raises(ConfigError, match="holds another model"):
        write_triton_repo(features_model[0], tmp_path, "m")
    assert open(r.model, "rb").read() == open(distance_model[0], "rb").read()
    assert "max_batch_size: 4" in open(r.config).read() != before
    with pytest.raises(ConfigError, match="name"):
        write_triton_repo(distance_model[0], tmp_path, "../escape")


def test_without_tritonclient_the_check_is_skipped_and_said(distance_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)
    r = write_triton_repo(distance_model[0], tmp_path, "m")
    assert not r.checked and "perceptual-engine[triton]" in r.note
    assert os.path.isfile(r.config) and os.path.isfile(r.model)


def test_cli_export_writes_the_repository(tmp_path, capsys):
    from perceptual_engine.cli.main import main

    code = main(["export", "--weights", "random", "--arch", "vgg16", "--layers", "relu1_2",
                 "--graph", "distance", "-o", str(tmp_path / "d.onnx"),
                 "--triton-repo", str(tmp_path / "repo"), "--triton-name", "lpdist"])
    assert code == 0
    out = capsys.readouterr().out
    assert "checked against Triton's schema and the graph" in out
    assert _parse(str(tmp_path / "repo" / "lpdist" / "config.pbtxt")).name == "lpdist"
    assert main(["export", "--weights", "random", "-o", str(tmp_path / "e.onnx"),
                 "--triton-name", "x"]) == 2


# -- names and repositories are checked before the export (they used to be after it, with errno) --

BAD_NAMES = {"": "empty", "a/b": "path separator", "..": "not a folder name", ".": "not a folder name",
             "m\n": "control character", "m\tx": "control character", "modèle": "non-ASCII",
             "模型": "non-ASCII", "-m": "not accepted", ".hidden": "not accepted",
             'm"x': "not accepted", "a\\b": "path separator"}


def _cli_export(tmp_path, *extra):
    from perceptual_engine.cli.main import main

    return main(["export", "--weights", "random", "--layers", "relu1_1", "--graph", "distance",
                 "-o", str(tmp_path / "d.onnx"), *extra])


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_a_bad_name_is_refused_before_the_export(name, tmp_path, capsys):
    code = _cli_export(tmp_path, "--triton-repo", str(tmp_path / "repo"), f"--triton-name={name}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and BAD_NAMES[name] in err, err
    assert "--triton-name" in err and "Traceback" not in err
    assert not (tmp_path / "d.onnx").exists() and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("case", ["repo is a file", "repo under a file", "name used by another"])
def test_a_bad_repo_is_refused_before_the_export(case, tmp_path, distance_model, capsys):
    repo = tmp_path / "repo"
    if case == "repo is a file":
        repo.write_text("x")
    elif case == "repo under a file":
        (tmp_path / "file").write_text("x")
        repo = tmp_path / "file" / "repo"
    else:
        write_triton_repo(distance_model[0], repo, "m")
    code = _cli_export(tmp_path, "--triton-repo", str(repo), "--triton-name", "m")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Errno" not in err, err
    assert ("--triton-name" if case.startswith("name") else "--triton-repo") in err
    assert not (tmp_path / "d.onnx").exists()


def test_names_round_trip_through_config_pbtxt(distance_model, tmp_path):
    """Triton requires config.pbtxt's name to equal the folder's: every accepted name does."""
    for name in ("m", "A.b-c_9", "9lives", "vgg19-distance.v2"):
        r = write_triton_repo(distance_model[0], tmp_path, name)
        assert _parse(r.config).name == name == os.path.basename(r.folder)


def test_an_empty_name_does_not_fall_back_to_the_stem(distance_model, tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        write_triton_repo(distance_model[0], tmp_path, "")
    assert os.listdir(tmp_path) == []


def test_a_rerun_into_the_same_entry_is_accepted(tmp_path, capsys):
    args = ("--triton-repo", str(tmp_path / "repo"), "--triton-name", "m")
    assert _cli_export(tmp_path, *args) == 0
    assert _cli_export(tmp_path, *args) == 0  # the same model again: a fresh config
    capsys.readouterr()
