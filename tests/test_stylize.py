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


# -- destinations, braces, defaults, overflow, signals ------------------------------------
def _copies(photos, folder):
    """Copies of the photos in ``folder`` (tests that might overwrite them use these)."""
    import shutil

    folder.mkdir(exist_ok=True)
    return [str(shutil.copy(p, folder / os.path.basename(p))) for p in photos]


def test_help_shows_the_defaults_that_run(photos, capsys):
    import re

    from perceptual_engine.cli.main import build_parser
    from perceptual_engine.cli.stylize import _spec_and_loss

    assert main(["stylize", "--help"]) == 0
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    # One block per option: its first line starts with two spaces and a dash.
    blocks = {}
    for block in re.split(r"\n(?=  -)", raw):
        words = block.split()
        if words and words[0].startswith("-"):
            blocks[words[0].rstrip(",")] = " ".join(words)

    def default(flag):
        m = re.search(r"\(default: ([^)]*)\)", blocks[flag])
        assert m, f"no default shown for {flag}: {blocks[flag]}"
        return re.sub(r",\s+", ",", m.group(1))  # argparse may wrap a long list after a comma

    args = build_parser().parse_args(["stylize", *photos, "-o", "o.png"])
    spec, loss = _spec_and_loss(args)  # what the command runs without spec flags
    assert default("--pooling") == spec.pooling == "avg"
    assert default("--gram") == loss.gram == "hw"
    content = default("--content").split(" when ")[0]
    assert dict(kv.split("=") for kv in content.split(",")) == {k: f"{v:g}" for k, v in loss.content.items()}
    style = default("--style").split(" when ")[0]
    assert dict(kv.split("=") for kv in style.split(",")) == {k: f"{v:g}" for k, v in loss.style.items()}
    assert loss.content == {"relu4_2": 1.0} and set(loss.style.values()) == {100.0}
    assert tuple(default("--layers").split("else ")[-1].split(",")) == spec.layers
    assert "content relu4_2 (weight 1); style relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (weight 100 " \
           "each); --gram hw; --pooling avg" in text


def test_demo_help_shows_the_demo_loss(capsys):
    # The same class as stylize's help: a command whose loss differs from export's says so.
    from perceptual_engine.cli.demo import default_loss
    from perceptual_engine.spec import FeatureSpec

    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    loss = default_loss(FeatureSpec(weights="random"))
    assert loss.content == {"relu2_2": 1.0} and set(loss.style.values()) == {1.0}
    assert "(default: relu2_2=1 (else the deepest layer) when --style" in text
    assert "(default: 1 on every layer when --content" in text
    assert "weight 1 on every layer" not in text


def test_destination_is_checked_before_step_1(cache, photos, tmp_path, capsys, monkeypatch):
    (tmp_path / "folder").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: let the folder answer as it would to a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(locked)
                            else real(p, mode, **kw))
    cases = [(str(tmp_path / "folder"), "is a folder"), (str(tmp_path / "no" / "o.png"), "does not exist"),
             (str(locked / "o.png"), "is not writable")]
    for out, why in cases:
        code = main(["stylize", *photos, "-o", out, "--steps", "2", "--cache-dir", cache[0], *FLAGS])
        err = capsys.readouterr().err
        assert code == 2 and why in err and "step 1/" not in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_extension_must_be_one_pillow_writes(photos, tmp_path, capsys):
    from perceptual_engine.errors import ImageError
    from perceptual_engine.images import save_image, writable_format

    for ext in (".psd", ".gbr", ".fli", ".cur", ".h5", ".xbm"):  # read-only, stub, or no RGB
        code, line = _one_line(capsys, ["stylize", *photos, "-o", str(tmp_path / f"o{ext}"), *FLAGS])
        assert code == 2 and "no image extension Pillow writes" in line, line
        assert writable_format(f"x{ext}") is None
        with pytest.raises(ImageError, match="no image extension Pillow writes"):
            save_image(tmp_path / f"o{ext}", np.zeros((3, 4, 5), np.float32))
    assert writable_format("x.PNG") == "PNG" and writable_format("x.tif") == "TIFF"
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_an_input_is_refused(cache, photos, tmp_path, capsys, monkeypatch):
    content, style = _copies(photos, tmp_path / "in")
    (tmp_path / "in" / "sub").mkdir()
    os.symlink(content, tmp_path / "link.png")
    os.link(style, tmp_path / "hard.png")
    before = [open(p, "rb").read() for p in (content, style)]
    monkeypatch.chdir(tmp_path / "in")
    spellings = ["./content.png", "sub/../content.png", str(tmp_path / "link.png"), "style.png",
                 str(tmp_path / "hard.png"), "content.png"]
    for out in spellings:
        code, line = _one_line(capsys, ["stylize", content, style, "-o", out, "--steps", "1",
                                        "--cache-dir", cache[0], *FLAGS])
        assert code == 2 and "an input image of this run" in line and "--overwrite-input" in line, (out, line)
    # A {step} template that would reach an input's name at some step is refused too.
    os.rename(content, tmp_path / "in" / "c-2.png")
    content = str(tmp_path / "in" / "c-2.png")
    code, line = _one_line(capsys, ["stylize", content, style, "-o", "c-{step}.png", "--steps", "3",
                                    "--cache-dir", cache[0], *FLAGS])
    assert code == 2 and "would overwrite" in line and "c-2.png" in line
    assert [open(p, "rb").read() for p in (content, style)] == before
    # Said explicitly, it is allowed.
    code = main(["stylize", content, style, "-o", "sub/../c-2.png", "--steps", "1", "--overwrite-input",
                 "--cache-dir", cache[0], *FLAGS])
    assert code == 0 and open(content, "rb").read() != before[0]


def test_braces_in_output_follow_the_documented_template(cache, photos, tmp_path, capsys):
    bad = {"o-{steps}.png": "has the field {steps}", "o-{step:q}.png": "{step:q} is not an integer format",
           "o-{}.png": "has the field {}", "o-{0}.png": "has the field {0}", "o-{.png": "unmatched brace",
           "o-}.png": "unmatched brace", "{step}/o.png": "in its folder", "o-{step!r}.png": "{step!r}",
           "o-{step.real}.png": "{step.real}", "o-{step:/>4}.png": "not a plain file-name part"}
    for out, why in bad.items():
        code, line = _one_line(capsys, ["stylize", *photos, "-o", str(tmp_path / out), "--save-every", "1",
                                        "--cache-dir", cache[0], *FLAGS])
        assert code == 2 and why in line and "{{ or }}" in line, (out, line)
        assert "step 1/" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    code = main(["stylize", *photos, "-o", str(tmp_path / "o-{step}.png"), "--steps", "2", "--save-every", "1",
                 "--cache-dir", cache[0], *FLAGS])
    assert code == 0 and f"wrote {tmp_path / 'o-2.png'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-1.png", "o-2.png"]
    code = main(["stylize", *photos, "-o", str(tmp_path / "x{{a}}-{step:03d}.png"), "--steps", "1",
                 "--cache-dir", cache[0], *FLAGS])
    assert code == 0 and (tmp_path / "x{a}-001.png").exists()
    # The library applies the same rule, before the first step.
    from perceptual_engine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"save_path .* has the field \{steps\}"):
        optimize_image(_Counting(), np.zeros((1, 3, 5, 5), np.float32), steps=2, save_every=1,
                       save_path=str(tmp_path / "o-{steps}.png"))


class _Counting(torch.nn.Module):
    """A quadratic loss toward 0.5, optionally scaled; counts its evaluations."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, x):
        self.calls += 1
        return {"total": ((x - 0.5) ** 2).flatten(1).sum(1) * self.scale}


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_overflowing_or_vanishing_loss_is_an_error_not_success(optimizer):
    from perceptual_engine.errors import OptimizationError

    x0 = np.random.default_rng(0).uniform(0, 1, (1, 3, 7, 9)).astype(np.float32)
    with pytest.raises(OptimizationError, match="Lower the loss weights") as err:
        optimize_image(_Counting(3e37), x0, steps=20, optimizer=optimizer)
    assert err.value.step == 1
    assert "--content/--style weights" in err.value.wording(lr="--lr", weights="the --content/--style weights",
                                                            init="--init noise")
    with pytest.raises(OptimizationError, match=r"has not changed in 5 step\(s\).*Raise the loss weights"):
        optimize_image(_Counting(1e-44), x0, steps=20, optimizer=optimizer)
    r = optimize_image(_Counting(1.0), x0, steps=6, optimizer=optimizer)  # a sane scale moves
    assert r.final_loss < r.initial_loss


def test_cli_errors_name_the_flags(cache, distance_model, photos, tmp_path, capsys):
    out = str(tmp_path / "o.png")
    code, line = _one_line(capsys, ["stylize", *photos, "-o", out, "--stop-below", "nan", *FLAGS])
    assert code == 2 and "--stop-below" in line and "stop_below" not in line
    code, line = _one_line(capsys, ["stylize", *photos, "-o", out, "--steps", "3", "--optimizer", "lbfgs",
                                    "--lr", "1e30", "--cache-dir", cache[0], *FLAGS])
    assert code == 1 and "Lower --lr (now 1e+30)" in line and ".out" not in line and "lr=" not in line
    code, line = _one_line(capsys, ["stylize", *photos, "-o", out, "--model", distance_model[0],
                                    "--device", "cpu"])
    assert code == 2 and "export --graph target --grad" in line and "--graph distance" not in line
    assert "drop --model" in line
    code, line = _one_line(capsys, ["stylize", *photos, "-o", out, "--size", "12", "--weights", "random"])
    assert code == 2 and "give a larger --size" in line
    assert not os.path.exists(out)


def test_loop_stops_between_steps_when_asked(cache, photos):
    polls = []

    def stop():
        polls.append(1)
        return len(polls) > 3

    r = stylize(*photos, spec=SPEC, loss=LOSS, cache_dir=cache[0], steps=50, device="cpu", stop=stop)
    assert (r.stopped, r.steps_done, len(r.losses)) == ("interrupted", 3, 3)


def test_a_signal_inside_the_loop_only_sets_a_flag():
    # A KeyboardInterrupt raised by a handler inside a step could land in Python code that
    # native code called (autograd's engine runs the loss's backward); in the loop, the
    # handler must only note the signal for the next poll.
    from perceptual_engine.cli.stylize import _Signals

    before = signal.getsignal(signal.SIGTERM)
    with _Signals() as signals:
        with pytest.raises(KeyboardInterrupt):  # outside the loop: at once, as Python's own
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        signals.received = None
        assert signals.poll() is False  # the loop has started
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signals.received == signal.SIGTERM and signals.poll() is True and signals.status == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_sigterm_keeps_the_last_saved_image_and_no_temporary_file(cache, photos, tmp_path):
    out = tmp_path / "out.png"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "perceptual_engine.cli", "stylize", *photos, "-o", str(out),
         "--steps", "100000", "--save-every", "1", "--cache-dir", cache[0], *FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no image saved within 120 s"
            time.sleep(0.05)
        time.sleep(0.2)  # a few saves later: the signal lands anywhere in a step or a save
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "terminated (SIGTERM) after step" in lines[0], err
    assert f"{out} holds the image of step" in lines[0]
    assert load_image(out).shape == (1, 3, 27, 33)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no .out.png.*.tmp left
