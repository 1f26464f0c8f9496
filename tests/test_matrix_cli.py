"""``perceptual-engine matrix``, ``nearest`` and ``dedup`` (docs/matrix.md)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from perceptual_engine._io import file_lock
from perceptual_engine.cli.main import main
from perceptual_engine.datasets.results import lock_path
from perceptual_engine.images import load_images
from perceptual_engine.runtime import Engine

H, W = 37, 45


def _save(path, arr):
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five 37x45 PNGs; d.png is a near-duplicate of a.png."""
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(3)
    base = (rng.uniform(0, 1, (H, W, 3)) * 255).astype(np.uint8)
    _save(root / "a.png", base)
    for name in ("b", "c", "e"):
        _save(root / f"{name}.png", (rng.uniform(0, 1, (H, W, 3)) * 255).astype(np.uint8))
    near = np.clip(base.astype(int) + rng.integers(-1, 2, base.shape), 0, 255).astype(np.uint8)
    _save(root / "d.png", near)
    return root


@pytest.fixture(scope="module")
def model(distance_model):
    return distance_model[0]


def _run(capsys, *argv):
    code = main([*map(str, argv), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_matrix_files_and_summary(capsys, folder, model, tmp_path):
    names = sorted(os.listdir(folder))
    ref = Engine(model, "cpu").matrix(load_images([folder / n for n in names]))
    code, out, err = _run(capsys, "matrix", folder, "--model", model, "-o", tmp_path / "m.npy", "--summary")
    assert code == 0, err
    got = np.load(tmp_path / "m.npy")
    np.testing.assert_allclose(got, ref["total"], rtol=1e-6, atol=0)
    meta = json.loads((tmp_path / "m.npy.meta.json").read_text())
    assert meta["rows"] == names and meta["columns"] == names and meta["errors"] == {}
    iu = np.triu_indices(len(names), 1)
    fields = dict(zip(out.split()[::2], out.split()[1::2]))
    assert float(fields["mean"]) == pytest.approx(float(ref["total"][iu].mean()), rel=1e-5)
    assert float(fields["min"]) == pytest.approx(float(ref["total"][iu].min()), rel=1e-5)
    assert int(fields["pairs"]) == 10

    code, _, err = _run(capsys, "matrix", folder, folder / "a.png", "--model", model,
                        "-o", tmp_path / "m.csv", "--term", "content.relu2_2")
    assert code == 0, err
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == ",a.png" and [ln.split(",")[0] for ln in lines[1:]] == names
    col = np.array([float(ln.split(",")[1]) for ln in lines[1:]])
    np.testing.assert_allclose(col, ref["content.relu2_2"][:, 0], rtol=1e-5, atol=1e-12)

    pq = pytest.importorskip("pyarrow.parquet")
    code, _, err = _run(capsys, "matrix", folder, "--model", model, "-o", tmp_path / "m.parquet")
    assert code == 0, err
    table = pq.read_table(tmp_path / "m.parquet").to_pydict()
    assert len(table["a"]) == 25 and table["a"][1] == "a.png" and table["b"][1] == "b.png"
    assert table["total"][1] == pytest.approx(float(ref["total"][0, 1]), rel=1e-6)


def test_unreadable_file_is_marked(capsys, folder, model, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for n in ("a.png", "b.png"):
        (root / n).write_bytes((folder / n).read_bytes())
    (root / "broken.png").write_bytes(b"not an image")
    code, _, err = _run(capsys, "matrix", root, "--model", model, "-o", tmp_path / "m.npy")
    assert code == 1 and "unreadable: broken.png" in err and "Traceback" not in err
    got = np.load(tmp_path / "m.npy")  # rows: a, b, broken
    assert np.isnan(got[2]).all() and np.isnan(got[:, 2]).all() and np.isfinite(got[:2, :2]).all()
    meta = json.loads((tmp_path / "m.npy.meta.json").read_text())
    assert "broken.png" in meta["errors"]


def test_sizes_one_image_empty_and_budget(capsys, folder, model, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes((folder / "a.png").read_bytes())
    _save(mixed / "z.png", np.zeros((40, 48, 3), np.uint8) + 90)
    out = tmp_path / "m.npy"
    np.save(out, np.ones(3))
    code, _, err = _run(capsys, "matrix", mixed, "--model", model, "-o", out)
    assert code == 1 and "37x45" in err and "40x48" in err and "--size-policy" in err
    assert np.array_equal(np.load(out), np.ones(3))  # a failed run leaves the old file
    code, _, err = _run(capsys, "matrix", mixed, "--model", model, "-o", out, "--size-policy", "center-crop")
    assert code == 0, err
    assert np.load(out).shape == (2, 2)

    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((folder / "a.png").read_bytes())
    code, text, err = _run(capsys, "matrix", one, "--model", model, "-o", out, "--summary")
    assert code == 0 and np.array_equal(np.load(out), np.zeros((1, 1), np.float32))
    assert "pairs 0" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "matrix", empty, "--model", model, "--summary")
    assert code == 1 and "no image files" in err

    code, _, err = _run(capsys, "matrix", folder, "--model", model, "--summary", "--memory-budget", "1M")
    assert code == 1 and "over the memory budget of 1.0 MiB" in err


def test_usage_errors(capsys, folder, model, tmp_path):
    code, _, err = _run(capsys, "matrix", folder, "--model", model, "-o", tmp_path / "m.txt")
    assert code == 2 and "accepted: .npy, .csv, .parquet" in err
    code, _, err = _run(capsys, "matrix", folder, "--model", model)
    assert code == 2 and "--summary" in err
    code, _, err = _run(capsys, "matrix", folder, "--model", model, "--summary", "--term", "nope")
    assert code == 2 and "--term 'nope'" in err
    out = tmp_path / "busy.npy"
    with file_lock(lock_path(str(out)), note="another run"):
        code, _, err = _run(capsys, "matrix", folder, "--model", model, "-o", out)
    assert code == 2 and "being written by another run" in err and not out.exists()


def test_nearest_and_dedup(capsys, folder, model):
    code, out, err = _run(capsys, "nearest", folder / "a.png", folder, "--model", model, "--k", "2",
                          "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["match"] == "d.png"  # never a.png itself
    ref = Engine(model, "cpu").distance(load_images([folder / "a.png"]), load_images([folder / "d.png"]))
    assert rows[0]["distance"] == pytest.approx(float(ref["total"][0]), rel=1e-4)
    code, out, _ = _run(capsys, "nearest", folder, folder, "--model", model, "--k", "3",
                        "--threshold", str(rows[0]["distance"] * 1.01), "--format", "csv")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "query,rank,match,distance,error"
    assert sorted(ln.split(",")[:3] for ln in lines[1:]) == [["a.png", "1", "d.png"], ["d.png", "1", "a.png"]]

    code, out, err = _run(capsys, "dedup", folder, "--model", model, "--threshold",
                          str(rows[0]["distance"] * 1.01), "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[1:] == [f"1,a.png,d.png,{float(out.splitlines()[1].split(',')[3])!r}",
                                    f"1,d.png,a.png,{float(out.splitlines()[2].split(',')[3])!r}"]
    assert "1 group(s)" in err


@pytest.mark.parametrize("command", ["matrix", "nearest", "dedup", "distance"])
def test_a_model_of_the_wrong_kind_is_a_usage_error_naming_the_commands_kinds(capsys, folder, command,
                                                                              features_model, tmp_path):
    args = {"matrix": ["matrix", folder, "--summary"], "nearest": ["nearest", folder / "a.png", folder],
            "dedup": ["dedup", folder, "--threshold", "0.1"],
            "distance": ["distance", folder / "a.png", folder / "b.png"]}[command]
    code, _, err = _run(capsys, *args, "--model", features_model[0])
    assert code == 2 and err.count("\n") == 1, err
    accepted = "distance|lpips|dists" if command == "distance" else "distance|lpips"
    assert f"{command} needs a model exported with `perceptual-engine export --graph {accepted}`" in err


def test_matrix_on_openvino_runs_f32_embeddings(capsys, folder, model, tmp_path):
    pytest.importorskip("openvino")
    names = sorted(os.listdir(folder))
    ref = Engine(model, "cpu").matrix(load_images([folder / n for n in names]))
    code = main(["matrix", str(folder), "--model", model, "-o", str(tmp_path / "m.npy"), "--device", "openvino"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "OpenVINO CPU f32" in err and "runs the embeddings in f32" in err
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), ref["total"], rtol=1e-4, atol=1e-9)
    code = main(["nearest", str(folder / "a.png"), str(folder), "--model", model, "--device", "openvino",
                 "--precision", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "--precision bf16 is not accepted by matrix, nearest and dedup" in err
    assert "Use --device openvino" not in err


@pytest.mark.parametrize("value", ["nan", "-0.1", "inf"])
def test_threshold_must_be_a_finite_distance(capsys, folder, model, value):
    for argv in (["dedup", folder, "--threshold", value], ["nearest", folder / "a.png", folder, "--threshold", value]):
        code, out, err = _run(capsys, *argv, "--model", model)
        assert code == 2 and "accepted: a finite distance >= 0" in err and out == ""


def test_a_sidecar_that_cannot_be_written_refuses_before_the_matrix_is_touched(capsys, folder, model, tmp_path):
    out = tmp_path / "m.npy"
    out.write_bytes(b"old")
    (tmp_path / "m.npy.meta.json").mkdir()
    code, _, err = _run(capsys, "matrix", folder, "--model", model, "-o", out)
    assert code == 2 and "its sidecar" in err and "is a folder" in err and "Errno" not in err
    assert out.read_bytes() == b"old"


def test_matrix_and_distance_word_an_unreadable_file_alike(capsys, folder, model, tmp_path):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(folder, root)
    (root / "zz.png").write_bytes(b"not an image at all")
    code, _, err = _run(capsys, "matrix", root, "--model", model, "--summary")
    said = [line for line in err.splitlines() if "zz.png" in line]
    assert code == 1 and len(said) == 1
    code, _, err2 = _run(capsys, "distance", root / "zz.png", root / "a.png", "--model", model)
    assert code == 1
    why = f"'{root / 'zz.png'}' is not an image Pillow can identify"
    assert why in said[0] and why in err2


def test_engine_matrix_refuses_zero_block_and_batch(model):
    from perceptual_engine.errors import ConfigError

    engine = Engine(model, "cpu")
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, H, W)).astype(np.float32)
    for kw in ({"block": 0}, {"batch_size": 0}, {"batch_size": -3}):
        with pytest.raises(ConfigError, match=f"{next(iter(kw))}=.* is not accepted; accepted: an integer >= 1"):
            engine.matrix(x, **kw)
