"""Result files are never lost or mixed: one writer, the producing model recorded,
pairs keyed by what they are, destinations checked before any work."""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import FeatureSpec, LossConfig, export_onnx
from perceptual_engine.cli import main
from perceptual_engine.datasets.results import ResultFile, sidecar_path
from perceptual_engine.errors import ConfigError, OutputError

LOSS = LossConfig(content={"relu1_2": 1.0})
TERMS = ["content.relu1_2", "total"]
IDENTITY = {"graph": "distance", "weights_sha256": "ab" * 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two models that differ only in their (random) weights."""
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (1, 2):
        path = str(folder / f"m{seed}.onnx")
        spec = FeatureSpec(arch="vgg16", layers=("relu1_2",), weights="random", seed=seed)
        export_onnx(spec, path, graph="distance", loss=LOSS)
        paths.append(path)
    return paths


def _img(path, seed):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(arr).save(str(path))


@pytest.fixture
def odd(tmp_path, monkeypatch):
    """tmp_path/odd/A and odd/B with three pairs; the working folder is tmp_path."""
    for i in range(3):
        _img(tmp_path / "odd" / "A" / f"{i}.png", i)
        _img(tmp_path / "odd" / "B" / f"{i}.png", i + 10)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _rows(path):
    return list(csv.DictReader(io.StringIO(open(path).read())))


# -- 1. one writer per file -----------------------------------------------------
def test_second_writer_is_refused_while_the_first_writes(tmp_path):
    path = str(tmp_path / "r.csv")
    first = ResultFile(path, TERMS, identity=IDENTITY)
    first.write({"a": "x", "b": "y", "content.relu1_2": 0.5, "total": 0.5, "error": ""})
    with pytest.raises(ConfigError, match=r"being written by another run \(perceptual-engine \(pid"):
        ResultFile(path, TERMS, identity=IDENTITY)
    first.write({"a": "x2", "b": "y2", "content.relu1_2": 0.25, "total": 0.25, "error": ""})
    first.close()
    assert [r["a"] for r in _rows(path)] == ["x", "x2"]  # the refused run touched nothing
    ResultFile(path, TERMS, identity=IDENTITY, resume=True).close()  # free again after close


def test_a_replaced_file_is_reported_not_a_success(tmp_path):
    path = str(tmp_path / "r.jsonl")
    f = ResultFile(path, TERMS, identity=IDENTITY)
    f.write({"a": "x", "b": "y", "content.relu1_2": 0.5, "total": 0.5, "error": ""})
    other = tmp_path / "other.jsonl"
    other.write_text("")
    os.replace(other, path)  # someone ignoring the lock
    with pytest.raises(OutputError, match="replaced or removed while this run wrote"):
        f.close()


def test_cli_second_writer_exits_2_and_first_keeps_its_rows(models, odd, capsys):
    held = ResultFile("out.csv", ["content.relu1_2", "total"], identity=IDENTITY)
    code, _, err = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0],
                        "--output", "out.csv")
    held.close()
    assert code == 2 and "being written by another run" in err and "Traceback" not in err
    code, _, _ = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0], "--output", "out.csv")
    assert code == 0 and len(_rows("out.csv")) == 3


# -- 2. the producing model is recorded, resume refuses another -------------------
def test_resume_with_another_model_is_refused(models, odd, capsys):
    code, _, _ = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0], "--output", "r.csv")
    assert code == 0
    record = json.load(open(sidecar_path("r.csv")))
    assert record["model"]["graph"] == "distance" and len(record["model"]["weights_sha256"]) == 64
    before = open("r.csv").read()
    code, _, err = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[1], "--output", "r.csv",
                        "--resume")
    assert code == 2
    assert "written by another model (differs in: graph_sha256, spec, weights_sha256)" in err
    assert open("r.csv").read() == before  # untouched


def test_resume_without_a_record_is_refused(odd):
    with open("old.csv", "w") as fh:
        fh.write("a,b,content.relu1_2,total,error\nx,y,0.5,0.5,\n")
    with pytest.raises(ConfigError, match="which model wrote its rows is unknown"):
        ResultFile("old.csv", TERMS, identity=IDENTITY, resume=True)


# -- 3. pairs are keyed by what they are ------------------------------------------
@pytest.mark.parametrize("spelling", ["./odd/A/", "abs", "link"])
def test_resume_with_the_same_folders_spelled_differently(models, odd, capsys, spelling):
    code, _, _ = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0], "--output", "r.csv")
    assert code == 0 and len(_rows("r.csv")) == 3
    if spelling == "abs":
        a = str(odd / "odd" / "A")
    elif spelling == "link":
        os.symlink(odd / "odd" / "A", odd / "alias")
        a = "alias"
    else:
        a = spelling
    code, out, err = _run(capsys, "distance", a, "odd/B/", "--model", models[0], "--output", "r.csv",
                          "--resume", "--format", "csv")
    assert code == 0
    assert "3 skipped" in err
    assert len(_rows("r.csv")) == 3  # each pair once


def test_resume_from_another_working_folder(models, odd, capsys, monkeypatch):
    code, _, _ = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0], "--output", "r.csv")
    assert code == 0
    monkeypatch.chdir(odd / "odd")
    code, _, err = _run(capsys, "distance", "A", "B", "--model", models[0], "--output", "../r.csv",
                        "--resume")
    assert code == 0 and "3 skipped" in err
    assert len(_rows(str(odd / "r.csv"))) == 3


# -- 4. destinations checked before the work --------------------------------------
def test_output_into_a_missing_folder_is_refused(models, odd, capsys):
    code, _, err = _run(capsys, "distance", "odd/A", "odd/B", "--model", models[0], "--output",
                        "nowhere/r.csv")
    assert code == 2 and "does not exist; create it first" in err
    assert not os.path.exists("nowhere")


def test_export_into_a_folder_fails_before_exporting(odd, capsys, monkeypatch):
    import perceptual_engine.export.exporter as exporter

    def boom(spec):
        raise AssertionError("weights were loaded: the export started")

    monkeypatch.setattr(exporter, "load_weights", boom)
    os.mkdir("dest")
    code, _, err = _run(capsys, "export", "--weights", "random", "--layers", "relu1_2", "-o", "dest")
    assert code == 2 and "is a folder" in err
    code, _, err = _run(capsys, "export", "--weights", "random", "--layers", "relu1_2", "-o",
                        "missing/m.onnx")
    assert code == 2 and "does not exist" in err
