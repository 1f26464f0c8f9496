"""The image-optimization loop (optimize_image) driven by the PyTorch reference loss.

No export here: the loop only needs a module with set_target and a differentiable
"total"; the engine-backed module is exercised in test_stylize.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import FeatureSpec, LossConfig, TorchPerceptualLoss, load_image
from perceptual_engine.errors import ConfigError
from perceptual_engine.optimize import optimize_image, prepare_images

SPEC = FeatureSpec(layers=("relu1_1", "relu2_1"), weights="random", seed=5)
LOSS = LossConfig(content={"relu2_1": 1.0}, style={"relu1_1": 100.0, "relu2_1": 100.0}, gram="hw")
H, W = 29, 35  # odd sizes


def _smooth(seed: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Seeded low-frequency image (1, 3, H, W) in [lo, hi]: a photo-like target."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 5, 6), dtype=np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    return (lo + (hi - lo) * up).numpy()


def _module(spec: FeatureSpec = SPEC) -> TorchPerceptualLoss:
    module = TorchPerceptualLoss(spec, LOSS)
    module.set_target(content=torch.from_numpy(_smooth(1, *_range(spec))),
                      style=torch.from_numpy(_smooth(2, *_range(spec))))
    return module


def _range(spec: FeatureSpec) -> tuple[float, float]:
    return (0.0, 1.0) if spec.input_range == "0,1" else (-1.0, 1.0)


@pytest.fixture(scope="module")
def module():
    return _module()


def _loss_of(module, image) -> float:
    with torch.no_grad():
        return float(module(torch.from_numpy(image))["total"].sum())


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_the_loss_goes_down_and_the_history_is_consistent(module, optimizer):
    x0 = _smooth(1)
    before = x0.copy()
    r = optimize_image(module, x0, steps=6, optimizer=optimizer)
    assert np.array_equal(x0, before)  # the start image is not modified
    assert (r.stopped, r.steps_done, len(r.losses)) == ("steps", 6, 7)
    assert r.losses[0] == pytest.approx(_loss_of(module, x0), rel=1e-6)
    assert r.losses[-1] < 0.5 * r.losses[0], r.losses
    # The reported final loss is that of the returned image, evaluated independently.
    assert r.final_loss == pytest.approx(_loss_of(module, r.image), rel=1e-5)
    assert r.terms["total"] == pytest.approx(r.final_loss, rel=1e-6)
    assert set(r.terms) == {"content.relu2_1", "style.relu1_1", "style.relu2_1", "total"}
    assert r.image.shape == (1, 3, H, W) and r.image.dtype == np.float32
    assert 0.0 <= r.image.min() and r.image.max() <= 1.0
    assert all(s > 0 for s in r.step_seconds) and r.seconds_per_step > 0
    assert r.evaluations >= 7


def test_stop_below_stops_at_the_first_loss_at_or_under_it(module):
    full = optimize_image(module, _smooth(1), steps=6)
    threshold = full.losses[3]
    r = optimize_image(module, _smooth(1), steps=6, stop_below=threshold)
    assert r.stopped == "stop_below" and r.steps_done == 3
    assert r.losses == full.losses[:4]  # the same run (Adam on the CPU is deterministic)
    assert all(v > threshold for v in r.losses[:-1]) and r.final_loss <= threshold
    assert r.final_loss == pytest.approx(_loss_of(module, r.image), rel=1e-5)
    at_start = optimize_image(module, _smooth(1), steps=6, stop_below=full.losses[0] * 2,
                              optimizer="lbfgs")
    assert (at_start.steps_done, at_start.stopped, len(at_start.losses)) == (0, "stop_below", 1)
    assert np.array_equal(at_start.image, _smooth(1))


def test_save_every_writes_the_image_of_that_step(module, tmp_path):
    seen, saves = [], []
    r = optimize_image(module, _smooth(1), steps=5, save_every=2,
                       save_path=tmp_path / "snap-{step:03d}.png",
                       progress=lambda k, n, loss: seen.append((k, n, loss)),
                       on_save=lambda k, path: saves.append((k, path)))
    assert r.saved == [str(tmp_path / "snap-002.png"), str(tmp_path / "snap-004.png")]
    assert saves == [(2, r.saved[0]), (4, r.saved[1])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap-002.png", "snap-004.png"]
    assert seen == [(k + 1, 5, r.losses[k]) for k in range(5)]
    # The step-4 image, 8-bit, is what a run of 4 steps returns.
    four = optimize_image(module, _smooth(1), steps=4)
    saved = load_image(tmp_path / "snap-004.png")
    assert np.abs(saved - four.image).max() <= 0.5 / 255 + 1e-6
    one = tmp_path / "one.png"
    optimize_image(module, _smooth(1), steps=3, save_every=1, save_path=one)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("one", ".one"))) == ["one.png"]


def test_pixels_are_clamped_to_the_minus_one_one_range():
    spec = FeatureSpec(layers=SPEC.layers, weights="random", seed=5, input_range="-1,1")
    module = _module(spec)
    r = optimize_image(module, _smooth(3, -1.0, 1.0), steps=4, lr=0.5, input_range="-1,1")
    assert r.image.min() >= -1.0 and r.image.max() <= 1.0
    assert (r.image == -1.0).any() and (r.image == 1.0).any()  # lr 0.5 drives some to the bounds
    assert (r.image < 0).mean() > 0.1  # not clamped to [0, 1]


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps=0"),
    (dict(optimizer="sgd"), "optimizer='sgd'"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(stop_below=float("nan")), "stop_below=nan"),
    (dict(save_every=2), "save_every= needs save_path="),
    (dict(input_range="0,255"), "input_range='0,255'"),
])
def test_bad_options_raise_config_errors(module, kw, match):
    with pytest.raises(ConfigError, match=match):
        optimize_image(module, _smooth(1), **kw)


def test_images_are_resized_by_the_longest_side_and_the_style_to_the_content(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    c, s = prepare_images(tmp_path / "c.png", tmp_path / "s.png", size=33)
    assert c.shape == s.shape == (1, 3, 22, 33)
    c, s = prepare_images(tmp_path / "c.png", tmp_path / "s.png", size=33, style_size=20,
                          input_range="-1,1")
    assert (c.shape, s.shape) == ((1, 3, 22, 33), (1, 3, 20, 12)) and c.min() < 0
    with pytest.raises(ConfigError, match=r"4x6 pixels, below 16"):
        prepare_images(tmp_path / "c.png", tmp_path / "s.png", size=6, min_size=16)
