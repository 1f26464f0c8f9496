"""What a new user broke, one regression test each: interrupts, seeds, duplicate layers,
odd model paths, corrupt PNGs, leaking warnings, API wording on the command line,
layers deeper than the loss needs."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx
from perceptual_engine.cli import main
from perceptual_engine.errors import ConfigError, ImageError, WeightsError
from perceptual_engine.images import decode
from perceptual_engine.weights import load_weights


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _png(path, seed=0, h=12, w=14):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(str(path))
    return str(path)


# -- 9. Ctrl-C anywhere: exit 130, one line ----------------------------------------
def _interrupt(argv, cwd, env, wait_for: str | None, delay: float = 0.0):
    """Start the CLI, send SIGINT once ``wait_for`` appears on stderr (or after ``delay``)."""
    # A job started in the background of a non-interactive shell inherits SIGINT ignored
    # (then Python installs no KeyboardInterrupt handler): restore the default, as a
    # terminal would have it.
    proc = subprocess.Popen([sys.executable, "-m", "perceptual_engine.cli", *argv], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    if wait_for is not None:
        deadline = time.monotonic() + 120
        while wait_for not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert wait_for in seen, seen
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, seen + err


@pytest.fixture
def cli_env(tmp_path):
    env = dict(os.environ, PERCEPTUAL_ENGINE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("point", ["start-up", "export", "model build"])
def test_sigint_exits_130_with_one_line(tmp_path, cli_env, point):
    spec = ["--weights", "random", "--layers", "relu1_2,relu2_2,relu3_1"]
    if point == "start-up":  # while torch is being imported
        code, err = _interrupt(["export", *spec, "-o", "m.onnx"], tmp_path, cli_env, None, delay=1.5)
    elif point == "export":
        code, err = _interrupt(["export", *spec, "-o", "m.onnx"], tmp_path, cli_env, "exporting")
    else:
        a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", 1)
        code, err = _interrupt(["distance", a, b, *spec], tmp_path, cli_env, "exporting the distance")
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "perceptual-engine: interrupted"
    assert not os.path.exists(tmp_path / "m.onnx")  # nothing half-written


def test_seed_out_of_range_is_a_config_error(capsys):
    code, _, err = _run(capsys, "export", "--weights", "random", "--seed", "99999999999999999999999",
                        "-o", "never.onnx")
    assert code == 2 and "out of range" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="seed -1 is out of range"):
        FeatureSpec(weights="random", seed=-1)


# -- 12. the model computes only what its loss needs ---------------------------------
def test_layers_deeper_than_the_loss_are_cut_with_a_warning(tmp_path):
    spec = FeatureSpec(arch="vgg19", layers=("relu1_1", "relu3_1", "relu5_4"), weights="random", seed=3)
    loss = LossConfig(content={"relu1_1": 1.0})
    path = str(tmp_path / "shallow.onnx")
    with pytest.warns(UserWarning, match=r"\['relu3_1', 'relu5_4'\] are not used by the loss"):
        export_onnx(spec, path, graph="distance", loss=loss)
    engine = Engine(path)
    assert engine.spec.layers == ("relu1_1",)
    cut = FeatureSpec(arch="vgg19", layers=("relu1_1",), weights="random", seed=3)
    assert engine.info.weights_sha256 == load_weights(cut).sha256  # the hash of what it holds
    x = np.random.default_rng(0).random((1, 3, 8, 9), dtype=np.float32)  # < relu5_4's 16
    assert np.isfinite(engine.distance(x, x[:, :, ::-1].copy())["total"]).all()


# -- 13. smaller ones ---------------------------------------------------------------
def test_duplicate_loss_layer_is_refused(capsys):
    code, _, err = _run(capsys, "export", "--weights", "random", "--content", "relu2_2,relu2_2=3",
                        "-o", "never.onnx")
    assert code == 2 and "relu2_2 is given twice" in err


def test_model_that_is_a_device_is_not_called_missing(tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", 1)
    code, _, err = _run(capsys, "distance", a, b, "--model", "/dev/zero")
    assert code == 1 and "not a regular file" in err and "missing" not in err


def test_png_with_a_bad_crc_is_called_corrupt(tmp_path):
    data = bytearray(open(_png(tmp_path / "ok.png"), "rb").read())
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="starts like a PNG file but is corrupt"):
        decode(str(tmp_path / "bad.png"))
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image Pillow can identify"):
        decode(str(tmp_path / "text.png"))


def test_refused_pickle_does_not_leak_torchs_warning(tmp_path):
    path = str(tmp_path / "w.pth")
    # Protocol 4 in torch's legacy format: refused by weights_only, and torch warns
    # "Detected pickle protocol 4" on the way; only our one-line error should remain.
    torch.save({"features.0.weight": torch.ones(1)}, path, pickle_protocol=4,
               _use_new_zipfile_serialization=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match="was refused"):
            load_weights(FeatureSpec(arch="vgg16", layers=("relu1_1",), weights=path))
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_cli_names_its_own_flags(tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", 1)
    export_onnx(FeatureSpec(arch="vgg16", layers=("relu1_1",), weights="random"),
                str(tmp_path / "m.onnx"), graph="distance")
    code, _, err = _run(capsys, "distance", a, b, "--model", str(tmp_path / "m.onnx"),
                        "--device", "cuda")
    assert code == 1 and "--device cpu" in err and "device='cpu'" not in err


def test_demo_size_below_the_minimum_exits_2(capsys):
    code, _, err = _run(capsys, "demo", "--weights", "random", "--size", "4", "--no-bench")
    assert code == 2 and "--size 4 is too small" in err


def test_a_swallowed_ctrl_c_still_stops_the_run(tmp_path, monkeypatch, capsys):
    # Python prints and drops a KeyboardInterrupt raised inside a callback (a weakref's,
    # during an import): the handler's record must stop the run at the next progress
    # line, before anything is written.
    from perceptual_engine.cli import common, export as export_cmd
    from perceptual_engine.cli.main import main

    real = export_cmd.spec_from_args

    def interrupted_on_the_way(args):
        common.INTERRUPTED[0] = True  # what the handler records; its exception was lost
        return real(args)

    monkeypatch.setattr(export_cmd, "spec_from_args", interrupted_on_the_way)
    out = tmp_path / "m.onnx"
    code = main(["export", "--weights", "random", "--layers", "relu1_2", "-o", str(out)])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "perceptual-engine: interrupted"
    assert not out.exists()
    monkeypatch.undo()
    assert main(["export", "--weights", "random", "--layers", "relu1_2", "-o", str(out)]) == 0  # reset per run


def test_ctrl_c_during_the_rows_says_where_they_are_once(tmp_path, monkeypatch, capsys, distance_model):
    # The handler records the interrupt and raises it; distance reports it with the
    # resume hint, and nothing raises it again or says it twice.
    from perceptual_engine.cli import common
    from perceptual_engine.cli.main import main
    from perceptual_engine.datasets import runner

    def ctrl_c(*args, **kwargs):
        common.INTERRUPTED[0] = True
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_pairs", ctrl_c)
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", 1)
    out = tmp_path / "rows.jsonl"
    code = main(["distance", a, b, "--model", distance_model[0], "--output", str(out)])
    assert code == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "interrupted" in ln]
    assert lines == [f"perceptual-engine: interrupted; the rows computed so far are in {out}, rerun with --resume"]
