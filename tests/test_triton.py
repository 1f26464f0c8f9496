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

# Every graph kind exported by conftest (one session-scoped export each).
GRAPH_FIXTURES = ["features_model", "distance_model", "style_model"]
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
    assert (config.max_batch_size > 0) == batched == (fixture != "style_model")
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
    assert p["precision_mode"] == "FP16" and p["trt_engine_cache_enable"] == "1"
    assert int(p["max_workspace_size_bytes"]) > 0 and p["trt_engine_cache_path"]
    images = [v.name for v in graph.input if v.name in ("x", "y")]
    for key in ("min", "opt", "max"):
        assert [s.split(":")[0] for s in p[f"trt_profile_{key}_shapes"].split(",")] == images
    (warm,) = config.model_warmup
    assert set(warm.inputs) == {v.name for v in graph.input}
    assert all(w.random_data for w in warm.inputs.values())


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
