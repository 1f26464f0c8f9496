"""Model metadata: schema validation (fuzzed), integrity digests, weights finiteness.

One exported distance model (conftest's ``distance_model``) is copied and its
``metadata_props`` or initializers rewritten with onnx.load/onnx.save per case.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from perceptual_engine import Engine, FeatureSpec, LossConfig, PerceptualError, export_onnx
from perceptual_engine.cli import main
from perceptual_engine.datasets.cache import check_entry, model_key
from perceptual_engine.errors import ConfigError, ModelError, WeightsError
from perceptual_engine.export import integrity
from perceptual_engine.export.metadata import FIELDS, FORMAT_VERSION, PREFIX, ModelInfo
from perceptual_engine.runtime import read_info
from perceptual_engine.weights import load_weights


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _rewrite(src, dst, change=None, **props) -> str:
    """Copy ``src`` to ``dst`` with metadata keys set (a value) or removed (None)."""
    m = onnx.load(str(src))
    current = {p.key: p.value for p in m.metadata_props}
    for key, value in props.items():
        if value is None:
            current.pop(PREFIX + key, None)
        else:
            current[PREFIX + key] = value
    del m.metadata_props[:]
    for k, v in current.items():
        m.metadata_props.add(key=k, value=v)
    if change is not None:
        change(m)
    onnx.save(m, str(dst))
    return str(dst)


def _spec_with(path, **changes) -> str:
    d = json.loads(_props(path)[PREFIX + "spec"])
    d.update(changes)
    return json.dumps(d)


def _loss_with(path, **changes) -> str:
    d = json.loads(_props(path)[PREFIX + "loss"])
    d.update(changes)
    return json.dumps(d)


# (case, key the error must name, props to set: a function of the original model's path)
FUZZ = {
    "spec a list": ("spec", lambda p: {"spec": "[1, 2]"}),
    "spec null": ("spec", lambda p: {"spec": "null"}),
    "spec a string": ("spec", lambda p: {"spec": '"vgg19"'}),
    "spec a number": ("spec", lambda p: {"spec": "42"}),
    "spec a bool": ("spec", lambda p: {"spec": "true"}),
    "spec not json": ("spec", lambda p: {"spec": "{'arch': 'vgg19'}"}),
    "spec empty": ("spec", lambda p: {"spec": ""}),
    "spec missing a key": ("spec", lambda p: {"spec": json.dumps(
        {k: v for k, v in json.loads(_props(p)[PREFIX + "spec"]).items() if k != "layers"})}),
    "spec unknown key": ("spec", lambda p: {"spec": _spec_with(p, colour="blue")}),
    "spec nested 100000 deep": ("spec", lambda p: {"spec": "[" * 100000 + "]" * 100000}),
    "spec nested in layers": ("spec", lambda p: {"spec": _spec_with(p, layers=json.loads("[" * 40 + "]" * 40))}),
    "spec huge string": ("spec", lambda p: {"spec": '"' + "x" * 5_000_000 + '"'}),
    "spec repeated key": ("spec", lambda p: {"spec": _props(p)[PREFIX + "spec"][:-1] + ', "arch": "vgg16"}'}),
    "spec NaN": ("spec", lambda p: {"spec": _spec_with(p, seed=float("nan"))}),
    "spec 5000-digit int": ("spec", lambda p: {"spec": _props(p)[PREFIX + "spec"].replace('"seed": 11', '"seed": ' + "9" * 5000)}),
    "layers a string": ("spec", lambda p: {"spec": _spec_with(p, layers="relu1_2")}),
    "layers numbers": ("spec", lambda p: {"spec": _spec_with(p, layers=[3, 8])}),
    "layers null": ("spec", lambda p: {"spec": _spec_with(p, layers=None)}),
    "layers unknown": ("spec", lambda p: {"spec": _spec_with(p, layers=["relu9_9"])}),
    "layer name huge": ("spec", lambda p: {"spec": _spec_with(p, layers=["x" * 60000])}),
    "arch unknown": ("spec", lambda p: {"spec": _spec_with(p, arch="vgg99")}),
    "arch a number": ("spec", lambda p: {"spec": _spec_with(p, arch=19)}),
    "seed a string": ("spec", lambda p: {"spec": _spec_with(p, seed="11")}),
    "seed a bool": ("spec", lambda p: {"spec": _spec_with(p, seed=True)}),
    "seed a float": ("spec", lambda p: {"spec": _spec_with(p, seed=11.0)}),
    "seed out of range": ("spec", lambda p: {"spec": _spec_with(p, seed=10**30)}),
    "input_range unknown": ("spec", lambda p: {"spec": _spec_with(p, input_range="0,255")}),
    "input_range a list": ("spec", lambda p: {"spec": _spec_with(p, input_range=[0, 1])}),
    "pooling unknown": ("spec", lambda p: {"spec": _spec_with(p, pooling="median")}),
    "weights a number": ("spec", lambda p: {"spec": _spec_with(p, weights=5)}),
    "loss a string": ("loss", lambda p: {"loss": '"chw"'}),
    "loss a list": ("loss", lambda p: {"loss": "[]"}),
    "loss not json": ("loss", lambda p: {"loss": "{content: 1}"}),
    "loss null on a distance graph": ("loss", lambda p: {"loss": "null"}),
    "loss unknown layer": ("loss", lambda p: {"loss": _loss_with(p, content={"relu5_4": 1.0})}),
    "loss negative weight": ("loss", lambda p: {"loss": _loss_with(p, content={"relu2_2": -1.0})}),
    "loss weight a string": ("loss", lambda p: {"loss": _loss_with(p, content={"relu2_2": "1"})}),
    "loss weight a bool": ("loss", lambda p: {"loss": _loss_with(p, style={"relu1_2": True})}),
    "loss content a list": ("loss", lambda p: {"loss": _loss_with(p, content=["relu2_2"])}),
    "loss gram unknown": ("loss", lambda p: {"loss": _loss_with(p, gram="l2")}),
    "loss no terms": ("loss", lambda p: {"loss": _loss_with(p, content={}, style={})}),
    "loss unknown key": ("loss", lambda p: {"loss": _loss_with(p, tv=1.0)}),
    "loss deeply nested": ("loss", lambda p: {"loss": '{"content": ' + "[" * 5000 + "]" * 5000 + "}"}),
    "graph unknown": ("graph", lambda p: {"graph": "segmentation"}),
    "graph empty": ("graph", lambda p: {"graph": ""}),
    "graph features with a loss": ("loss", lambda p: {"graph": "features"}),
    "dtype int8": ("dtype", lambda p: {"dtype": "int8"}),
    "dtype json": ("dtype", lambda p: {"dtype": '"float32"'}),
    "format abc": ("format", lambda p: {"format": "abc"}),
    "format 0": ("format", lambda p: {"format": "0"}),
    "format negative": ("format", lambda p: {"format": "-2"}),
    "format 99": ("format", lambda p: {"format": "99"}),
    "format 1 (older)": ("format", lambda p: {"format": "1"}),
    "format 2 (older)": ("format", lambda p: {"format": "2"}),
    "format huge": ("format", lambda p: {"format": "9" * 100000}),
    "weights_sha256 not hex": ("weights_sha256", lambda p: {"weights_sha256": "z" * 64}),
    "weights_sha256 short": ("weights_sha256", lambda p: {"weights_sha256": "ab12"}),
    "weights_sha256 upper case": ("weights_sha256", lambda p: {"weights_sha256": "AB" * 32}),
    "weights_source empty": ("weights_source", lambda p: {"weights_source": ""}),
    "weights_source control chars": ("weights_source", lambda p: {"weights_source": "random\n(seed=11)"}),
    "weights_source disagrees": ("weights_source", lambda p: {"weights_source": "imagenet"}),
    "version empty": ("version", lambda p: {"version": ""}),
    "version huge": ("version", lambda p: {"version": "1" * 1_000_000}),
    "grad not a bool": ("grad", lambda p: {"grad": "yes"}),
    "grad json true": ("grad", lambda p: {"grad": "True"}),
    "grad on a features graph": ("grad", lambda p: {"graph": "features", "loss": "null", "grad": "true"}),
    "graph_sha256 not hex": ("graph_sha256", lambda p: {"graph_sha256": "not a digest"}),
    "integrity missing": ("integrity", lambda p: {"integrity": None}),
    "graph missing": ("graph", lambda p: {"graph": None}),
    "unknown key": ("colour", lambda p: {"colour": "blue"}),
    "unknown key, huge name": ("x" * 30, lambda p: {"x" * 100000: "1"}),
    "loss layer name huge": ("loss", lambda p: {"loss": _loss_with(p, content={"y" * 60000: 1.0})}),
}


@pytest.fixture(scope="module")
def fuzzed(distance_model, tmp_path_factory):
    """{case: (path, key)}: one copy of the distance model per malformed variant."""
    src = distance_model[0]
    folder = tmp_path_factory.mktemp("fuzz")
    return {case: (_rewrite(src, folder / f"{i}.onnx", **make(src)), key)
            for i, (case, (key, make)) in enumerate(FUZZ.items())}


def test_at_least_twenty_variants():
    assert len(FUZZ) >= 20


@pytest.mark.parametrize("case", list(FUZZ))
def test_fuzzed_metadata_is_a_model_error_naming_the_key(fuzzed, case):
    path, key = fuzzed[case]
    with pytest.raises(ModelError) as info:
        Engine(path, device="cpu")
    msg = str(info.value)
    named = PREFIX + key if key != "format" else "format"
    assert named in msg, msg[:300]
    assert re.search(r"re-export", msg, re.I), msg
    assert len(msg) < 900 and "\n" not in msg, msg  # shortened: one readable line
    assert all(c * 300 not in msg for c in "xy[9"), msg[:300]


def test_fuzzed_metadata_through_the_cli(fuzzed, tmp_path, capsys):
    a = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 29, 3), dtype=np.uint8)).save(a)
    for case, (path, key) in fuzzed.items():
        code = main(["distance", str(a), str(a), "--model", path])
        out, err = capsys.readouterr()
        assert code in (1, 2), (case, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("perceptual-engine: error:"), (case, err[:500])
        assert "Traceback" not in err and out == "", case


def test_read_info_raises_only_model_errors(fuzzed):
    for case, (path, _) in fuzzed.items():
        try:
            read_info(path)
        except ModelError:
            continue
        except BaseException as exc:  # noqa: BLE001 - the point is which type escapes
            pytest.fail(f"{case}: {type(exc).__name__}: {str(exc)[:200]}")
        pytest.fail(f"{case}: accepted")


def test_duplicate_metadata_key(distance_model, tmp_path):
    def twice(m):
        m.metadata_props.add(key=PREFIX + "dtype", value="float16")

    p = _rewrite(distance_model[0], tmp_path / "dup.onnx", change=twice)
    with pytest.raises(ModelError, match=r"metadata key perceptual_engine\.dtype appears twice"):
        Engine(p)


# -- spec / loss from dicts of the wrong shape -----------------------------------------------

@pytest.mark.parametrize("value", [[1, 2], None, "vgg19", 3, True])
def test_spec_and_loss_from_dict_refuse_non_mappings(value):
    with pytest.raises(ConfigError, match="needs a mapping"):
        FeatureSpec.from_dict(value)
    with pytest.raises(ConfigError, match="needs a mapping"):
        LossConfig.from_dict(value)


@pytest.mark.parametrize("d, pattern", [
    ({"layers": 5}, "layers 5 is not accepted"),
    ({"layers": [["relu1_2"]]}, "layers .* is not accepted"),
    ({"arch": ["vgg19"]}, "arch \\['vgg19'\\] is not accepted"),
    ({"pooling": {"max": 1}}, "pooling .* is not accepted"),
    ({"seed": 2**64}, "seed .* is out of range"),
    ({"seed": -1}, "seed -1 is out of range"),
    ({"weights": None}, "weights None is not accepted"),
])
def test_spec_from_dict_wrong_types(d, pattern):
    with pytest.raises(ConfigError, match=pattern):
        FeatureSpec.from_dict(d)


@pytest.mark.parametrize("d, pattern", [
    ({"content": ["relu2_2"]}, "content must map layer names"),
    ({"content": 0}, "content must map layer names"),
    ({"style": "relu1_2"}, "style must map layer names"),
    ({"content": {"relu2_2": None}}, "weight of 'relu2_2' is None"),
    ({"content": {"relu2_2": 1.0}, "gram": 1}, "gram 1 is not accepted"),
])
def test_loss_from_dict_wrong_types(d, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LossConfig.from_dict(d)


def test_loss_term_order_survives_the_metadata():
    # The order of the terms is the order of the graph's outputs: sorting the loss JSON
    # (as format 1 did) made a model whose loss was not in sorted order unloadable.
    spec = FeatureSpec(layers=("relu1_2", "conv1_1"), weights="random")
    loss = LossConfig(content={"relu1_2": 1.0, "conv1_1": 2.0}, style={"relu1_2": 1.0})
    info = ModelInfo(spec=spec, loss=loss, graph="distance", dtype="float32",
                     weights_source="random(seed=0)", weights_sha256="0" * 64, version="0.1.0")
    model = onnx.ModelProto()
    integrity.seal(model, info)
    back = ModelInfo.from_props({p.key: p.value for p in model.metadata_props}, "m.onnx")
    assert back.output_names == ("content.relu1_2", "content.conv1_1", "style.relu1_2", "total")
    assert back.spec == spec and back.loss == loss and len(back.graph_sha256) == 64


def test_every_stored_field_is_a_model_info_attribute():
    import dataclasses

    attrs = {f.name for f in dataclasses.fields(ModelInfo)}
    assert {k for k, f in FIELDS.items() if f.stored} <= attrs


# -- integrity: what the metadata claims is bound to the graph ---------------------------------

def _edit_initializer(m):
    t = max((t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4),
            key=lambda t: int(np.prod(t.dims)))  # a conv weight, not the (1, 3, 1, 1) normalization
    a = numpy_helper.to_array(t).copy()
    a.flat[7] += 1e-3  # one weight, slightly
    t.CopyFrom(numpy_helper.from_array(a, t.name))


@pytest.mark.parametrize("case", ["one weight", "input_range", "weights claim", "weights_sha256", "loss weight"])
def test_edits_after_export_are_refused(distance_model, tmp_path, case):
    src = distance_model[0]
    if case == "one weight":
        p = _rewrite(src, tmp_path / "w.onnx", change=_edit_initializer)
        pattern = r"weights or graph .* do not match the graph_sha256 recorded at export"
    else:
        sha = _props(src)[PREFIX + "weights_sha256"]
        props = {
            "input_range": {"spec": _spec_with(src, input_range="-1,1")},
            # random weights claimed as ImageNet: both keys changed so they agree with each other
            "weights claim": {"spec": _spec_with(src, weights="imagenet"), "weights_source": "imagenet"},
            "weights_sha256": {"weights_sha256": sha[::-1]},
            "loss weight": {"loss": _loss_with(src, content={"relu2_2": 1000.0, "relu3_1": 0.5})},
        }[case]
        p = _rewrite(src, tmp_path / "m.onnx", **props)
        pattern = r"metadata .* does not match the integrity digest recorded at export"
    with pytest.raises(ModelError, match=pattern + r".*edited after export.*[Rr]e-export"):
        Engine(p, device="cpu")


def test_untouched_copy_loads_and_runs(distance_model, tmp_path, make_images):
    path, spec, loss, _ = distance_model
    p = tmp_path / "copy.onnx"
    _rewrite(path, p)  # loaded and saved again by onnx: same content, same digests
    engine = Engine(p, device="cpu")
    assert engine.info.spec == spec and engine.info.loss == loss
    assert engine.info.format == FORMAT_VERSION and len(engine.info.graph_sha256) == 64
    out = engine.distance(make_images((2, 3, 37, 41), seed=1), make_images((2, 3, 37, 41), seed=2))
    assert np.isfinite(out["total"]).all()


def test_graph_digest_once_per_file_identity(distance_model, tmp_path, monkeypatch):
    calls = []
    real = integrity.graph_digest

    def counting(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(integrity, "graph_digest", counting)
    p = tmp_path / "model.onnx"
    shutil.copyfile(distance_model[0], p)
    Engine(p, device="cpu")
    assert len(calls) == 1
    Engine(p, device="cpu")
    read_info(str(p))
    assert len(calls) == 1  # same file, unchanged: not hashed again
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    read_info(str(p))
    assert len(calls) == 2  # touched: another identity, hashed again
    link = tmp_path / "link.onnx"
    os.symlink(p, link)
    read_info(str(link))
    assert len(calls) == 2  # the same real file under another name
    # The metadata digest is cheap and checked every time, cached or not.
    edited = _rewrite(p, tmp_path / "edited.onnx", version="9.9.9")
    with pytest.raises(ModelError, match="edited after export"):
        read_info(edited)


def _as_format_1(src, dst) -> str:
    """``src`` as an earlier version wrote it: format 1, no digests, no grad, the loss sorted."""
    props = _props(src)
    loss = json.dumps(json.loads(props[PREFIX + "loss"]), sort_keys=True)
    return _rewrite(src, dst, format="1", graph_sha256=None, integrity=None, grad=None, loss=loss)


@pytest.mark.parametrize("fmt", ["1", "2"])
def test_older_formats_are_refused_with_re_export(distance_model, tmp_path, fmt):
    p = _as_format_1(distance_model[0], tmp_path / "old.onnx")
    if fmt == "2":  # format 2 added grad, still without digests
        p = _rewrite(p, tmp_path / "old2.onnx", format="2", grad="false")
    with pytest.raises(ModelError, match=rf"has metadata format '{fmt}', written by an older perceptual-engine "
                                         r"without an integrity digest.*Re-export the model"):
        Engine(p)


def test_format_1_cache_entries_are_rebuilt(distance_model, tmp_path):
    from perceptual_engine._io import sha256_file

    path, spec, loss, _ = distance_model
    key = model_key(spec, loss)
    entry = tmp_path / f"{key}.onnx"

    def sidecar():
        (tmp_path / f"{key}.json").write_text(json.dumps({"key": key, "sha256": sha256_file(entry)}))

    shutil.copyfile(path, entry)
    sidecar()
    record, why = check_entry(str(entry), key, spec, loss, "float32")
    assert record is not None, why  # an intact current entry is reused
    _as_format_1(path, entry)
    sidecar()  # the sidecar vouches for the file: only the format can refuse it
    record, why = check_entry(str(entry), key, spec, loss, "float32")
    assert record is None and "format '1'" in why


# -- weights with NaN or Inf --------------------------------------------------------------

WEIGHTS_SPEC = FeatureSpec(layers=("relu1_2",), weights="random", seed=3)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_refused_at_load(tmp_path, ext, bad):
    state = {k: v.clone() for k, v in load_weights(WEIGHTS_SPEC).state.items()}
    state["features.2.weight"][5, 3, 1, 2] = float(bad)
    state["features.0.bias"][-1] = -float("inf")
    path = tmp_path / f"w{ext}"
    if ext == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    spec = FeatureSpec(layers=WEIGHTS_SPEC.layers, weights=str(path))
    with pytest.raises(WeightsError, match=r"hold NaN or Inf values in 2 tensor\(s\): features\.0\.bias \(1 of 64 "
                                           r"values, first at index \(63,\)\); features\.2\.weight \(1 of 36864 "
                                           r"values, first at index \(5, 3, 1, 2\)\).*use another checkpoint"):
        load_weights(spec)
    out = tmp_path / "m.onnx"
    with pytest.raises(WeightsError):
        export_onnx(spec, out)  # refused at load, before any export
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [f"w{ext}"]


def test_non_finite_weights_through_the_cli(tmp_path, capsys):
    state = {k: v.clone() for k, v in load_weights(WEIGHTS_SPEC).state.items()}
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    code = main(["export", "--layers", "relu1_2", "--weights", str(path), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("perceptual-engine: error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert "features.0.weight (1 of 1728 values" in err


def test_every_error_here_is_a_perceptual_error():
    assert issubclass(ModelError, PerceptualError) and issubclass(WeightsError, PerceptualError)


def test_a_model_rewritten_in_place_with_mtime_restored_is_checked_again(features_model, tmp_path):
    """The per-process cache of verified graph digests keys files by identity: a model whose
    weights are changed in place, same size, mtime set back, must fail its digest."""
    import os
    import shutil
    import time

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from perceptual_engine.errors import ModelError
    from perceptual_engine.runtime import read_info

    path = str(tmp_path / "m.onnx")
    shutil.copyfile(features_model[0], path)
    read_info(path)  # verified and remembered
    model = onnx.load(path)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 1.0
    init.raw_data = values.tobytes()
    data = model.SerializeToString()
    st = os.stat(path)
    assert len(data) == st.st_size
    time.sleep(0.05)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelError, match="do not match the graph_sha256"):
        read_info(path)
