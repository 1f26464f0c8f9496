"""The bad-input catalogue through the command line: files, folders, models, weights.

A bad image is reported in its pair's row (exit 1, the run goes on); a bad model,
weights file or usage gives one line on stderr, no traceback, exit 1 or 2.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import FeatureSpec, LossConfig, export_onnx
from perceptual_engine.cli import main

SPEC = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random", seed=2)
LOSS = LossConfig(content={"relu2_2": 1.0})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "d.onnx"
    export_onnx(SPEC, path, graph="distance", loss=LOSS)
    return str(path)


def _png(path, h=24, w=28, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _bytes_of(fmt, seed=0):
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(side=30000):
    """A valid PNG header claiming side x side pixels (900 M), with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _make_bad(case, tmp_path):
    """Returns the path of B for a pair (A is always a good image)."""
    p = tmp_path / "b.png"
    if case == "missing file":
        return str(tmp_path / "nope.png"), "does not exist|not found|missing"
    if case == "folder where a file is expected":
        (tmp_path / "dir.png").mkdir()
        return str(tmp_path / "dir.png"), "folder|directory"
    if case == "truncated png":
        p.write_bytes(_bytes_of("PNG")[:300])
        return str(p), "truncated|broken|cannot|could not"
    if case == "truncated jpeg":
        p = tmp_path / "b.jpg"
        p.write_bytes(_bytes_of("JPEG")[:400])
        return str(p), "truncated|broken|cannot|could not"
    if case == "decompression bomb":
        p.write_bytes(_bomb_png())
        return str(p), "pixels|bomb|budget"
    if case == "not an image":
        p.write_bytes(b"#!/bin/sh\necho not an image\n" * 20)
        return str(p), "not an image|cannot identify|could not"
    if case == "empty file":
        p.write_bytes(b"")
        return str(p), "empty|not an image|cannot identify|could not"
    raise AssertionError(case)


FILE_CASES = ["missing file", "folder where a file is expected", "truncated png", "truncated jpeg",
              "decompression bomb", "not an image", "empty file"]


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_image_pair_is_a_row_not_a_crash(model, tmp_path, capsys, case):
    a = _png(tmp_path / "a.png")
    b, pattern = _make_bad(case, tmp_path)
    code = main(["distance", a, b, "--model", model, "--format", "csv"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if case in ("missing file", "folder where a file is expected"):
        # Two paths that are not both files nor both folders may be a usage error.
        assert code in (1, 2)
    else:
        assert code == 1
    assert re.search(pattern, out + err, flags=re.I), out + err


def test_unreadable_file(model, tmp_path, capsys, monkeypatch):
    a = _png(tmp_path / "a.png")
    b = _png(tmp_path / "b.png", seed=1)
    os.chmod(b, 0)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root reads files whatever their mode: make opening b fail as it would for a user
        import builtins

        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == b:
                raise PermissionError(13, "Permission denied", b)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    code = main(["distance", a, b, "--model", model])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "ermission" in out + err


def test_symlink_loop_in_folder_mode_terminates(model, tmp_path, capsys):
    for side in ("a", "b"):
        d = tmp_path / side
        (d / "sub").mkdir(parents=True)
        _png(d / "sub" / "x.png", seed=ord(side))
        os.symlink(d, d / "sub" / "loop")  # sub/loop -> a/ : an endless tree if followed
    code = main(["distance", str(tmp_path / "a"), str(tmp_path / "b"), "--model", model,
                 "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("x.png") >= 1 and "Traceback" not in err


def _one_line_error(capsys, argv, code):
    got = main(argv)
    out, err = capsys.readouterr()
    assert got == code, (got, err)
    lines = [l for l in err.strip().splitlines() if l.startswith("perceptual-engine: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


MODEL_CASES = {
    "not onnx": (lambda m, t: _write(t / "x.onnx", b"hello" * 100), "not a readable ONNX"),
    "truncated": (lambda m, t: _write(t / "t.onnx", open(m, "rb").read()[:50000]), "not a readable ONNX"),
    "missing": (lambda m, t: str(t / "none.onnx"), "missing"),
}


def _write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_one_line(model, tmp_path, capsys, case):
    make, pattern = MODEL_CASES[case]
    a = _png(tmp_path / "a.png")
    line = _one_line_error(capsys, ["distance", a, a, "--model", make(model, tmp_path)], 1)
    assert re.search(pattern, line), line


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_executing_weights_refused_by_export(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"features.0.weight": _Evil(str(tmp_path / "pwned"))}, fh)
    line = _one_line_error(capsys, ["export", "--layers", "relu1_1", "--weights", str(path),
                                    "-o", str(tmp_path / "m.onnx")], 1)
    assert "refused" in line and "execute code" in line
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv,code", [
    (["distance"], 2),
    (["export", "--layers", "relu9_9", "--weights", "random", "-o", "x.onnx"], 2),
    (["export", "--arch", "vgg11", "-o", "x.onnx"], 2),
    (["distance", "a.png", "b.png", "--device", "tpu"], 2),
    (["distance", "a.png", "b.png", "--batch-size", "0"], 2),
])
def test_usage_and_config_errors(capsys, argv, code):
    got = main(argv)
    out, err = capsys.readouterr()
    assert got == code and "Traceback" not in err


