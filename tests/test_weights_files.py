"""Damaged weights files: every loader turns every read failure into one clear line.

The VGG trunk (.pth, .safetensors) and the LPIPS heads (.pth) are cut at many
points (0 bytes, 1 byte, inside the header, inside the data, one byte short), or
replaced by random bytes or text. The library raises WeightsError (LinearWeightsError
for LPIPS) naming the file; the command line prints one line naming the flag that
fixes it: --lpips-weights for the LPIPS heads, --weights for the trunk.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from perceptual_engine import FeatureSpec
from perceptual_engine.cli.main import main
from perceptual_engine.errors import LinearWeightsError, WeightsError, first_line
from perceptual_engine.weights import load_weights

SHALLOW = ("relu1_1",)


def _lpips_linear(path):
    from perceptual_engine.lpips.core import LAYERS, _keys

    g = torch.Generator().manual_seed(3)
    state = {k: torch.rand(shape, generator=g) for k, shape in _keys().items()}
    assert len(state) == len(LAYERS)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory, tv_weights_file):
    folder = tmp_path_factory.mktemp("good-weights")
    return {"vgg.pth": tv_weights_file("vgg19", ".pth"),
            "vgg.safetensors": tv_weights_file("vgg19", ".safetensors"),
            "lpips.pth": _lpips_linear(folder / "lin.pth")}


def _damaged(good: str, how: str, folder) -> str:
    data = open(good, "rb").read()
    cut = {"empty": 0, "one byte": 1, "header": 40, "a third": len(data) // 3,
           "one byte short": len(data) - 1}
    ext = os.path.splitext(good)[1]
    path = folder / f"{how.replace(' ', '_')}{ext}"
    if how in cut:
        path.write_bytes(data[:cut[how]])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(4).bytes(3000))
    else:
        path.write_text("not a checkpoint\n" * 30)
    return str(path)


DAMAGE = ["empty", "one byte", "header", "a third", "one byte short", "random bytes", "text"]


def _load(kind: str, path: str):
    if kind == "lpips.pth":
        from perceptual_engine.lpips import load_linear_weights

        return load_linear_weights(path)
    return load_weights(FeatureSpec(layers=SHALLOW, weights=path))


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", ["vgg.pth", "vgg.safetensors", "lpips.pth"])
def test_every_loader_refuses_every_damage_in_one_line(kind, how, good_files, tmp_path):
    path = _damaged(good_files[kind], how, tmp_path)
    cls = LinearWeightsError if kind == "lpips.pth" else WeightsError
    with pytest.raises(cls) as info:
        _load(kind, path)
    msg = str(info.value)
    assert "\n" not in msg and repr(path) in msg, msg
    assert "weights_only=False" not in msg  # torch's advice, never ours
    if kind != "lpips.pth":
        assert not isinstance(info.value, LinearWeightsError)


@pytest.mark.parametrize("how", ["empty", "a third", "random bytes"])
def test_cli_names_lpips_weights_for_a_damaged_lpips_file(how, good_files, tmp_path, capsys):
    from PIL import Image

    path = _damaged(good_files["lpips.pth"], how, tmp_path)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((37, 45, 3), np.uint8)).save(img)
    for cmd in (["distance", str(img), str(img), "--graph", "lpips", "--weights", "random",
                 "--lpips-weights", path, "--cache-dir", str(tmp_path / "cache")],
                ["export", "--graph", "lpips", "--weights", "random", "--lpips-weights", path,
                 "-o", str(tmp_path / "m.onnx")]):
        code = main(cmd)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 1 and len(lines) == 1, err
        assert "Traceback" not in err and repr(path) in lines[0]
        assert "--lpips-weights PATH" in lines[0]
        assert "--weights" not in lines[0].replace("--lpips-weights", ""), lines[0]
        assert not os.path.exists(tmp_path / "m.onnx")


def test_cli_names_weights_for_a_damaged_trunk_file(good_files, tmp_path, capsys):
    path = _damaged(good_files["vgg.pth"], "empty", tmp_path)
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((37, 45, 3), np.uint8)).save(img)
    code = main(["distance", str(img), str(img), "--weights", path, "--layers", "relu1_1",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "--weights PATH" in lines[0] and "--lpips-weights" not in lines[0]


@pytest.mark.parametrize("exc", [EOFError(), RuntimeError(""), KeyError(101), OSError("\n\n"),
                                 ValueError("first\nsecond")])
def test_first_line_never_fails(exc):
    text = first_line(exc)
    assert text.startswith(type(exc).__name__ + ": ") and "\n" not in text
