"""LPIPS on the command line: distance over folders with maps, the cache key, refusals."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import Engine
from perceptual_engine import lpips as L
from perceptual_engine.datasets.cache import check_entry, model_key
from perceptual_engine.cli.main import main
from perceptual_engine.datasets.spatial import map_to_uint8
from perceptual_engine.images import decode

pytest.importorskip("lpips")


def _folders(tmp_path, n=3, shape=(35, 41, 3)):
    rng = np.random.default_rng(21)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(n):
        img = (rng.random(shape) * 255).astype(np.uint8)
        noisy = np.clip(img.astype(int) + rng.integers(-30 * (i + 1), 30 * (i + 1), shape), 0, 255)
        Image.fromarray(img).save(a / f"{i}.png")
        Image.fromarray(noisy.astype(np.uint8)).save(b / f"{i}.png")
    return a, b


def test_distance_folders_with_maps(lpips_models, tmp_path, capsys):
    path, spec, _ = lpips_models["fp32"]  # inputs [-1, 1]; the runner maps decoded [0, 1] there
    a, b = _folders(tmp_path)
    out, maps = tmp_path / "rows.jsonl", tmp_path / "maps"
    rc = main(["distance", str(a), str(b), "--model", path, "--device", "cpu",
               "--output", str(out), "--spatial-dir", str(maps), "--format", "csv"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(rows[0]) == ["a", "b", *L.output_names(), "error"]  # no spatial, no grad.x column
    engine = Engine(path, "cpu")
    pngs = sorted(os.listdir(maps))
    assert len(pngs) == 3
    for row in rows:
        x = decode(row["a"])[None] * 2 - 1
        y = decode(row["b"])[None] * 2 - 1
        want = engine.distance(x, y)
        assert row["total"] == pytest.approx(float(want["total"][0]), rel=1e-6)
        png = next(p for p in pngs if p.startswith(f"{os.path.basename(row['a'])[:-4]}__"))
        img = np.asarray(Image.open(maps / png))
        assert img.shape == (35, 41) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, map_to_uint8(want["spatial"][0, 0]))
        assert img.max() == 255
    # larger noise, larger LPIPS
    totals = [r["total"] for r in sorted(rows, key=lambda r: r["a"])]
    assert totals == sorted(totals)


def test_io_binding_output_shapes(lpips_models):
    """The shapes IO binding preallocates for an LPIPS model (CUDA tensors in, checked on
    the GPU by the gpu tests) equal what ONNX Runtime returns on the CPU."""
    from perceptual_engine.runtime.iobinding import output_shapes

    engine = Engine(lpips_models["fp32"][0], "cpu")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 35, 41)).astype(np.float32)
    got = engine.distance(x, x[::-1].copy())
    assert output_shapes(engine, 2, 35, 41) == {k: v.shape for k, v in got.items()}


def test_cache_key_and_entry_check(lpips_models, tmp_path):
    path, spec, _ = lpips_models["fp32"]
    lin = L.load_linear_weights()
    other = L.check_linear_weights(
        {f"lin{i}.model.1.weight": w * 2 for i, w in enumerate(lin.weights)}, "other")
    keys = {model_key(spec, None, "float32", "lpips", lin, s) for s in (False, True)}
    keys.add(model_key(spec, None, "float32", "lpips", other, True))
    assert len(keys) == 3
    key = model_key(spec, None, "float32", "lpips", lin, True)
    from perceptual_engine._io import sha256_file

    side = os.path.splitext(path)[0] + ".json"
    with open(side, "w") as fh:
        json.dump({"key": key, "sha256": sha256_file(path)}, fh)
    try:
        # The fixture's float32 model also outputs grad.x.
        assert check_entry(path, key, spec, None, "float32", "lpips", lin, True, grad=True)[0] is not None
        why = check_entry(path, key, spec, None, "float32", "lpips", other, True, grad=True)[1]
        assert "LPIPS weights or spatial" in why
        assert check_entry(path, key, spec, None, "float32", "lpips", lin, False, grad=True)[0] is None
        assert check_entry(path, key, spec, None, "float32", "lpips", lin, True)[0] is None
    finally:
        os.remove(side)


@pytest.mark.parametrize("argv, code, match", [
    (["export", "--graph", "lpips", "--arch", "vgg19", "-o", "m.onnx"], 2, "LPIPS needs arch 'vgg16'"),
    (["export", "--graph", "lpips", "--layers", "relu1_2,relu2_2", "-o", "m.onnx"], 2,
     "LPIPS needs arch 'vgg16'"),
    (["export", "--graph", "lpips", "--style", "relu1_2=1", "-o", "m.onnx"], 2, "Drop them"),
    (["export", "--graph", "distance", "--spatial", "-o", "m.onnx"], 2, "options of --graph lpips"),
    (["distance", "a.png", "b.png", "--graph", "lpips", "--pooling", "avg"], 2, "max pooling"),
    (["distance", "a.png", "b.png", "--spatial-dir", "maps"], 2, "--spatial-dir writes LPIPS maps"),
])
def test_refusals(argv, code, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((33, 33, 3), 128, np.uint8)).save(tmp_path / name)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert match in err
    assert err.count("\n") == 1 or err.startswith("usage:")  # one line, or argparse's usage
    assert not (tmp_path / "m.onnx").exists()


def test_lpips_missing_on_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the package looks itself up
    rc = main(["export", "--graph", "lpips", "--weights", "random", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "pip install perceptual-engine[lpips]" in err and "--lpips-weights" in err


def test_demo_lpips_column(lpips_models, distance_model, tmp_path, monkeypatch):
    """The demo's table gains an LPIPS column. Both models are the session's fixtures
    (the demo's exports are replaced), so nothing is exported here."""
    import io

    import perceptual_engine.cli.demo as demo
    from perceptual_engine.datasets.cache import CachedModel

    dpath, dspec, dloss, _ = distance_model
    monkeypatch.setattr(demo, "export_model",
                        lambda spec, *a: (spec, CachedModel(dpath, "d", built=False)))
    lpath = lpips_models["fp32"][0]
    monkeypatch.setattr(demo, "lpips_model", lambda *a: (CachedModel(lpath, "k", built=False), "random"))
    out, err = io.StringIO(), io.StringIO()
    rc = demo.run_demo(dspec, dloss, out_dir=str(tmp_path / "out"), size=40, bench=False,
                       device="cpu", dists=False, out=out, err=err)
    text = out.getvalue()
    assert rc == 0
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("gaussian", "jpeg"))]
    assert len(lines) == 9 and "LPIPS" in text and "lpips v0.1 linear weights" in text
    values = [float(ln.split()[-1]) for ln in lines]
    assert all(np.isfinite(values)) and min(values) > 0
    blur = values[:3]
    assert blur == sorted(blur)  # more blur, larger LPIPS
