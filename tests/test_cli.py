"""The command line, in process: main([...]) -> exit status, with capsys.

One shallow distance model (relu1_2, relu2_2, random weights) is exported once
for the module; the commands that export (export, demo, distance without
--model) use the same shallow spec to stay fast.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import LossConfig, export_onnx
from perceptual_engine.datasets import cache
from perceptual_engine.cli import main
from perceptual_engine.errors import ModelError
from perceptual_engine.spec import FeatureSpec

SPEC_FLAGS = ["--layers", "relu1_2,relu2_2", "--weights", "random", "--content", "relu2_2=1",
              "--style", "relu1_2=1"]
SPEC = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
LOSS = LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0})
TERMS = ["content.relu2_2", "style.relu1_2", "total"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "d.onnx")
    export_onnx(SPEC, path, graph="distance", loss=LOSS)
    return path


def _img(path, h=32, w=32, seed=0):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(str(path))
    return str(path)


@pytest.fixture
def folders(tmp_path):
    """a/ and b/ with 4 common images (one broken in b), one file on each side only."""
    a, b = tmp_path / "a", tmp_path / "b"
    for i, rel in enumerate(["1.png", "2.png", "sub/3.png", "sub/4.png"]):
        _img(a / rel, seed=i)
        _img(b / rel, seed=i + 10)
    (b / "sub" / "4.png").write_bytes(b"truncated garbage")
    _img(a / "left_only.png")
    _img(b / "sub" / "right_only.png")
    return str(a), str(b)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


# -- distance -------------------------------------------------------------------
def test_two_files_table(model, tmp_path, capsys):
    a, b = _img(tmp_path / "x.png"), _img(tmp_path / "y.png", seed=1)
    code, out, err = _run(capsys, "distance", a, b, "--model", model)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["a", "b", *TERMS, "error"]
    cells = row.split()
    assert cells[:2] == [a, b] and float(cells[-1]) > 0
    assert "1 pair(s): 1 ok, 0 failed" in err and "idle" in err
    assert "\r" not in err  # stderr is not a TTY: no progress bar
    assert "Traceback" not in err


def test_folders_one_sided_and_broken_rows_exit_1(model, folders, tmp_path, capsys):
    a, b = folders
    out_csv = str(tmp_path / "r.csv")
    code, out, err = _run(capsys, "distance", a, b, "--model", model, "--format", "csv",
                          "--output", out_csv, "--batch-size", "2")
    assert code == 1
    rows = _csv_rows(out)
    assert len(rows) == 6
    by_name = {os.path.relpath(r["a"], a): r for r in rows}
    assert "only in" in by_name["left_only.png"]["error"]
    assert "only in" in by_name["sub/right_only.png"]["error"]
    assert "not an image" in by_name["sub/4.png"]["error"]
    for name in ("1.png", "2.png", "sub/3.png"):
        assert not by_name[name]["error"] and float(by_name[name]["total"]) > 0
        assert by_name[name]["b"] == os.path.join(b, *name.split("/"))
    assert "left_only.png" in err and "right_only.png" in err  # listed on stderr too
    assert "6 pair(s): 3 ok, 3 failed" in err
    assert _csv_rows(open(out_csv).read()) == rows  # the file holds the same rows


def test_output_jsonl_and_format_json(model, folders, tmp_path, capsys):
    a, b = folders
    out_jsonl = str(tmp_path / "r.jsonl")
    code, out, _ = _run(capsys, "distance", a, b, "--model", model, "--format", "json",
                        "--output", out_jsonl)
    assert code == 1
    shown = json.loads(out)
    written = [json.loads(line) for line in open(out_jsonl)]
    assert shown == written and len(written) == 6
    assert list(written[0]) == ["a", "b", *TERMS, "error"]
    ok = [r for r in written if r["error"] is None]
    assert len(ok) == 3 and all(r["total"] > 0 for r in ok)
    assert all(r["total"] is None for r in written if r["error"])


def test_resume_computes_only_missing_pairs(model, folders, tmp_path, capsys):
    a, b = folders
    full = str(tmp_path / "full.csv")
    _run(capsys, "distance", a, b, "--model", model, "--output", full, "--format", "csv")
    rows = _csv_rows(open(full).read())
    good = [r for r in rows if not r["error"]]
    # An interrupted run: header, one finished row, one failed row, a row cut short.
    partial = str(tmp_path / "partial.csv")
    with open(partial, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerow(good[0])
        w.writerow(next(r for r in rows if r["error"]))
        fh.write(f"{good[1]['a']},{good[1]['b']},0.12")
    shutil.copy(full + ".meta.json", partial + ".meta.json")  # the interrupted run's record
    code, out, err = _run(capsys, "distance", a, b, "--model", model, "--output", partial,
                          "--resume", "--format", "csv")
    assert code == 1  # the broken and one-sided pairs still fail
    computed = _csv_rows(out)
    assert good[0]["a"] not in {r["a"] for r in computed}  # skipped
    assert len(computed) == len(rows) - 1
    assert "1 skipped" in err
    final = _csv_rows(open(partial).read())
    assert sorted((r["a"], r["b"]) for r in final) == sorted((r["a"], r["b"]) for r in rows)
    assert final[0] == good[0]
    for r in final:  # same numbers as the uninterrupted run
        ref = next(x for x in rows if x["a"] == r["a"])
        assert r["error"] == ref["error"]
        if not r["error"]:
            assert float(r["total"]) == pytest.approx(float(ref["total"]), rel=1e-5)
    # Everything done: a second resume computes nothing and keeps the file.
    code, out, err = _run(capsys, "distance", *folders, "--model", model, "--output", partial,
                          "--resume", "--format", "csv")
    assert len(_csv_rows(out)) == 3  # only the 3 failing pairs are retried
    assert len(_csv_rows(open(partial).read())) == len(rows)


@pytest.mark.parametrize("policy,code,shape", [("error", 1, None), ("resize", 0, (32, 32)),
                                               ("center-crop", 0, (24, 32))])
def test_size_policies(model, tmp_path, capsys, policy, code, shape):
    a, b = _img(tmp_path / "a.png", 32, 32), _img(tmp_path / "b.png", 24, 40, seed=3)
    got, out, err = _run(capsys, "distance", a, b, "--model", model, "--size-policy", policy,
                         "--format", "json")
    assert got == code
    row = json.loads(out)[0]
    if shape is None:
        assert "sizes differ: 32x32 vs 24x40" in row["error"]
    else:
        assert row["error"] is None and row["total"] > 0


def test_pairs_csv_option(model, tmp_path, capsys):
    _img(tmp_path / "x.png"), _img(tmp_path / "y.png", seed=2)
    (tmp_path / "pairs.csv").write_text("a,b\nx.png,y.png\ny.png,x.png\nx.png,x.png\n")
    code, out, _ = _run(capsys, "distance", "--pairs", str(tmp_path / "pairs.csv"),
                        "--model", model, "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 3
    assert rows[0]["total"] == pytest.approx(rows[1]["total"], rel=1e-5) and rows[2]["total"] == 0


def test_spec_flags_export_into_the_cache_once(tmp_path, capsys, monkeypatch):
    a, b = _img(tmp_path / "x.png"), _img(tmp_path / "y.png", seed=1)
    calls = []
    real = cache.export_onnx

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(cache, "export_onnx", counting)
    argv = ["distance", a, b, *SPEC_FLAGS, "--cache-dir", str(tmp_path / "c"), "--format", "csv"]
    code, out1, err = _run(capsys, *argv)
    assert code == 0 and len(calls) == 1 and "exporting the distance model" in err
    entry = os.path.join(str(tmp_path / "c"), "models", cache.model_key(SPEC, LOSS) + ".onnx")
    mtime = os.stat(entry).st_mtime_ns
    code, out2, err = _run(capsys, *argv)
    assert code == 0 and len(calls) == 1 and "using the cached model" in err
    assert os.stat(entry).st_mtime_ns == mtime and out1 == out2


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_tty_only(model, folders, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr", _TTY())
    import sys

    main(["distance", *folders, "--model", model, "--format", "csv"])
    err = sys.stderr.getvalue()
    assert "\r[" in err and "6/6 pairs" in err and "ETA" in err


def test_interrupted_run_keeps_its_rows_and_resumes(model, folders, tmp_path, capsys,
                                                     monkeypatch):
    import perceptual_engine.datasets.runner as runner

    real = runner._decode_pair
    seen = []

    def interrupt_on_third(pair, *args):
        seen.append(pair)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(pair, *args)

    monkeypatch.setattr(runner, "_decode_pair", interrupt_on_third)
    out_csv = str(tmp_path / "r.csv")
    code, _, err = _run(capsys, "distance", *folders, "--model", model, "--output", out_csv,
                        "--batch-size", "1", "--workers", "1")
    assert code == 130 and "rerun with --resume" in err
    kept = _csv_rows(open(out_csv).read())
    assert 1 <= len(kept) < 6
    monkeypatch.setattr(runner, "_decode_pair", real)
    code, out, err = _run(capsys, "distance", *folders, "--model", model, "--output", out_csv,
                          "--resume", "--format", "csv")
    final = _csv_rows(open(out_csv).read())
    assert len(final) == 6 and len({(r["a"], r["b"]) for r in final}) == 6
    assert len(_csv_rows(out)) == 6 - sum(not r["error"] for r in kept)


# -- exit statuses and errors ------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [],
    ["distance"],
    ["distance", "only_one.png"],
    ["distance", "a.png", "b.png", "--pairs", "p.csv"],
    ["distance", "a.png", "b.png", "--resume"],
    ["distance", "a.png", "b.png", "--batch-size", "0"],
    ["distance", "a.png", "b.png", "--content", "relu2_2=heavy"],
    ["export", "--graph", "distance"],  # no -o
    ["nonsense"],
])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and "usage:" in err and "Traceback" not in err


def test_config_errors_exit_2_with_one_line(model, tmp_path, capsys):
    a = _img(tmp_path / "x.png")
    code, _, err = _run(capsys, "distance", a, a, "--model", model, "--layers", "relu1_2")
    assert code == 2 and err.strip().startswith("perceptual-engine: error: --model reads the spec")
    code, _, err = _run(capsys, "distance", a, a, "--layers", "relu9_9", "--weights", "random")
    assert code == 2 and "unknown layer 'relu9_9'" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "export", "--content", "relu2_2=1", "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "--graph distance" in err


def test_library_errors_exit_1_with_one_line(model, tmp_path, capsys):
    a = _img(tmp_path / "x.png")
    code, out, err = _run(capsys, "distance", a, a, "--model", str(tmp_path / "none.onnx"))
    assert code == 1 and out == ""
    assert err.startswith("perceptual-engine: error: model ") and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "distance", a, str(tmp_path / "missing.png"), "--model", model)
    assert code == 1 and "does not exist" in err and "Traceback" not in err
    with pytest.raises(ModelError):  # --traceback: the exception itself, for bug reports
        main(["--traceback", "distance", a, a, "--model", str(tmp_path / "none.onnx")])


def test_imagenet_without_download_fails_with_the_fix(tmp_path, capsys, monkeypatch):
    import torch.hub

    def offline(*args, **kw):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, _, err = _run(capsys, "export", "--layers", "relu1_2", "-o", str(tmp_path / "m.onnx"))
    assert code == 1 and not os.path.exists(tmp_path / "m.onnx")
    line = [ln for ln in err.splitlines() if "error:" in ln][0]
    assert "ImageNet" in line and "random" in line and ".pth" in line


# -- export, info, demo ---------------------------------------------------------------
def test_export_prints_what_it_wrote(tmp_path, capsys):
    path = str(tmp_path / "f.onnx")
    code, out, err = _run(capsys, "export", "--layers", "relu1_2", "--weights", "random",
                          "--seed", "3", "--pooling", "avg", "--input-range=-1,1", "-o", path)
    assert code == 0 and os.path.isfile(path)
    assert f"wrote {path}" in out and "MB" in out
    assert "inputs    x: float32 (N, 3, H, W)" in out
    assert "output    relu1_2: float32 (N, 64, H/1, W/1)" in out
    assert "relu1_2" in out.split("parity")[1] and "max rel" in out
    assert "seed 3" in out and "input range -1,1" in out and "avg pooling" in out
    from perceptual_engine.runtime import read_info

    info = read_info(path)
    assert info.spec == FeatureSpec(layers=("relu1_2",), weights="random", seed=3,
                                    input_range="-1,1", pooling="avg")


def test_info_text_and_json(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0
    for word in ("perceptual-engine", "torch", "torchvision", "onnxruntime", "CPUExecutionProvider"):
        assert word in out
    code, out, _ = _run(capsys, "info", "--json")
    info = json.loads(out)
    providers = {p["name"]: p for p in info["providers"]}
    assert providers["CPUExecutionProvider"]["loads"] is True
    for p in providers.values():
        assert p["loads"] or p["reason"]  # never a bare "no"
    if info["cuda_driver_gpus"] == 0:
        assert info["auto_device_uses"] == "CPUExecutionProvider"
        assert all(not p["loads"] for n, p in providers.items() if n != "CPUExecutionProvider"
                   and n in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))


def test_demo_with_fallback_banner_then_reuse(tmp_path, capsys, monkeypatch):
    import perceptual_engine.cli.demo as demo
    from perceptual_engine.errors import WeightsError

    def no_imagenet(spec):
        raise WeightsError("could not download the ImageNet weights (offline). Accepted: ...")

    monkeypatch.setattr(demo, "load_weights", no_imagenet)
    import perceptual_engine.bench as bench

    def broken_bench(config):
        raise RuntimeError("simulated benchmark failure")

    monkeypatch.setattr(bench, "run", broken_bench)
    out_dir = str(tmp_path / "out")
    argv = ["demo", "-o", out_dir, "--layers", "relu1_2,relu2_2", "--size", "48", "--no-lpips"]
    code, out, err = _run(capsys, *argv)
    assert code == 0
    assert "FALLS BACK TO" in err and "SEEDED RANDOM WEIGHTS" in err and "offline" in err
    assert "weights random" in out and "max rel" in out
    assert out.count("gaussian blur") == 3 and out.count("jpeg") >= 3
    assert "grows with strength" in out or "WARNING" in out
    assert "speed table unavailable" in out and "simulated benchmark failure" in out
    assert os.path.isfile(os.path.join(out_dir, "vgg19-distance.onnx"))
    code, out, err = _run(capsys, *argv, "--no-bench")
    assert code == 0 and "reused" in out and "skipped (--no-bench)" in out
