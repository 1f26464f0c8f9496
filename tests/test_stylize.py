"""stylize on the Engine (target graph with gradient) and the ``stylize`` command.

One model is exported into a cache (conftest.target_grad_cache); the API and the
CLI find it there by its key (spec, loss, graph, grad), so nothing else is exported.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from perceptual_engine import FeatureSpec, LossConfig, TorchPerceptualLoss, load_image, stylize
from perceptual_engine.cli import main
from perceptual_engine.optimize import optimize_image, prepare_images

from conftest import TARGET_GRAD_LOSS as LOSS, TARGET_GRAD_SPEC as SPEC

# The same spec and loss as command-line flags (stylize's own defaults: --gram hw, --pooling avg).
FLAGS = ["--weights", "random", "--seed", "0", "--content", "relu1_2=1",
         "--style", "relu1_1=1,relu1_2=1", "--gram", "chw", "--pooling", "max", "--device", "cpu"]
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture(scope="module")
def cache(target_grad_cache):
    root, _, path = target_grad_cache
    return root, path


def _photo(path, h, w, seed):
    """A seeded smooth color image (low frequencies, like a photo), 8-bit."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 4, 5), dtype=np.float32))
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    arr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    return _photo(d / "content.png", 27, 33, 1), _photo(d / "style.png", 40, 31, 2)


def _reference(content, style):
    ref = TorchPerceptualLoss(SPEC, LOSS)
    ref.set_target(content=torch.from_numpy(content), style=torch.from_numpy(style))
    return ref


def test_stylize_on_the_engine_follows_the_pytorch_reference(cache, photos):
    folder, path = cache
    r = stylize(*photos, spec=SPEC, loss=LOSS, cache_dir=folder, steps=5, device="cpu",
                init="noise", seed=3)
    assert r.model_path == path and r.providers == ["CPUExecutionProvider"]  # reused, not re-exported
    assert (r.stopped, r.steps_done, r.image.shape) == ("steps", 5, (1, 3, 27, 33))
    assert r.final_loss < 0.7 * r.initial_loss, r.losses
    # The same loop on the autograd reference (style resized to the content's size):
    # the engine's gradient agrees to ~1e-6, so five Adam steps agree closely.
    content, style = prepare_images(*photos)
    assert style.shape == content.shape
    ref = _reference(content, style)
    noise = np.random.default_rng(3).uniform(0, 1, content.shape).astype(np.float32)
    expected = optimize_image(ref, noise, steps=5)
    np.testing.assert_allclose(r.losses, expected.losses, rtol=1e-3)
    np.testing.assert_allclose(r.image, expected.image, atol=1e-3)


def test_lbfgs_and_noise_start_on_the_engine(cache, photos):
    folder, _ = cache
    r = stylize(*photos, spec=SPEC, loss=LOSS, cache_dir=folder, steps=4, optimizer="lbfgs",
                init="noise", size=21, device="cpu")
    assert r.image.shape == (1, 3, 17, 21)
    assert r.final_loss < 0.7 * r.initial_loss, r.losses


def test_cli_writes_the_image_and_reports_the_losses(cache, photos, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["stylize", *photos, "-o", str(out), "--steps", "3", "--cache-dir", cache[0], *FLAGS])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "initial loss" in cap.out and "final loss" in cap.out and "s per step" in cap.out
    assert "step 3/3 loss" in cap.err  # plain progress lines: stderr is not a terminal here
    assert "exporting" not in cap.err  # the cached model was found by its key
    assert load_image(out).shape == (1, 3, 27, 33)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def _one_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


def test_cli_usage_errors_exit_2_in_one_line(photos, tmp_path, capsys):
    content, style = photos
    out = str(tmp_path / "o.png")
    code, line = _one_line(capsys, ["stylize", str(tmp_path / "nope.jpg"), style, "-o", out, *FLAGS])
    assert code == 2 and "nope.jpg' does not exist" in line
    text = tmp_path / "style.png"
    text.write_text("not an image")
    code, line = _one_line(capsys, ["stylize", content, str(text), "-o", out, *FLAGS])
    assert code == 2 and "is not an image Pillow can identify" in line
    code, line = _one_line(capsys, ["stylize", content, style, "-o", out, "--steps", "0", *FLAGS])
    assert code == 2 and "--steps: 0 is not >= 1" in line
    # Gatys' layers (the default) reach relu5_1, which needs 16 pixels a side.
    code, line = _one_line(capsys, ["stylize", content, style, "-o", out, "--size", "12",
                                    "--weights", "random"])
    assert code == 2 and "10x12 pixels, below 16" in line
    code, line = _one_line(capsys, ["stylize", content, style, "-o", str(tmp_path / "o.xyz"), *FLAGS])
    assert code == 2 and "no image extension" in line
    assert not (tmp_path / "o.png").exists()  # nothing written on a usage error


def test_sigint_keeps_the_last_saved_image(cache, photos, tmp_path):
    out = tmp_path / "out.png"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "perceptual_engine.cli", "stylize", *photos, "-o", str(out),
         "--steps", "100000", "--save-every", "1", "--cache-dir", cache[0], *FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # A shell without job control starts background jobs with SIGINT ignored, and a
        # child inherits that: restore the default so Python turns SIGINT into Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no image saved within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted after step" in lines[0] and "Traceback" not in err, err
    assert f"{out} holds the image of step" in lines[0]
    assert load_image(out).shape == (1, 3, 27, 33)  # a whole image, not half of one
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left
