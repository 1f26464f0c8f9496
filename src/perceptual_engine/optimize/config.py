"""What an image optimization is asked and what it returns: the defaults of
``stylize`` (layers, weights, pooling, Gram normalization, learning rates), the checks
of the loop's options, and StylizeResult.

Defaults, after Gatys, Ecker and Bethge, "Image Style Transfer Using Convolutional
Neural Networks" (CVPR 2016):

- VGG19; style on relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (the paper's
  conv1_1..conv5_1, taken after their ReLU as the paper's code does), content on
  relu4_2 (the paper's conv4_2, likewise): deep enough to keep the layout of the
  content image, not its textures.
- Average pooling (the paper's choice for image synthesis; ``pooling="max"`` is one
  argument away).
- Grams normalized by H·W (``gram="hw"``): then our style term is exactly 4·E_l of
  the paper (E_l = Σ(G − A)² / (4 N² M²) with raw Grams), independent of image size.
- Weights: content 1, each style layer ``DEFAULT_STYLE_WEIGHT``: chosen so that,
  starting from the content image, the style terms dominate the first steps and the
  content term grows until both pull against each other (see docs/stylize.md for
  the measurement behind the figure). The paper's α/β ratio does not transfer: its
  content term is a sum, ours a mean, so the ratio would depend on the image size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from ..spec import FeatureSpec, LossConfig

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"
# Network order: the spec's layers, so the network is cut after relu5_1.
GATYS_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
DEFAULT_STYLE_WEIGHT = 1e2
DEFAULT_POOLING = "avg"  # Gatys' choice for synthesis (gatys_spec); max is the network as trained
DEFAULT_GRAM = "hw"
# A run whose image has not changed after this many steps (while its loss is above 0)
# cannot be moving: its updates are below float32's resolution of the pixels.
STALL_STEPS = 5
OPTIMIZERS = ("adam", "lbfgs")
INITS = ("content", "noise")
# Learning rates for pixels in [0, 1]; scaled by the width of the input range.
DEFAULT_LR = {"adam": 0.02, "lbfgs": 1.0}

Progress = Callable[[int, int, float], None]  # (steps done, steps asked, current loss)


def gatys_spec(weights: str = "imagenet", *, arch: str = "vgg19", seed: int = 0,
               pooling: str = DEFAULT_POOLING, input_range: str = "0,1") -> FeatureSpec:
    """The default spec of ``stylize``: ``arch`` cut after relu5_1 (GATYS_LAYERS), with
    average pooling, as the paper synthesizes images (its gradient is smooth; max
    pooling's jumps where two values in a window are nearly equal)."""
    return FeatureSpec(arch=arch, layers=GATYS_LAYERS, weights=weights, seed=seed,
                       pooling=pooling, input_range=input_range)


def default_loss(spec: FeatureSpec, gram: str = DEFAULT_GRAM) -> LossConfig:
    """Content on relu4_2 (else the spec's deepest layer), style on the other layers
    (all of them when the spec has one), each style layer weighted DEFAULT_STYLE_WEIGHT."""
    content = CONTENT_LAYER if CONTENT_LAYER in spec.layers else spec.deepest
    style = [n for n in spec.layers if n != content] or [content]
    return LossConfig(content={content: 1.0}, style={n: DEFAULT_STYLE_WEIGHT for n in style},
                      gram=gram)


@dataclass
class StylizeResult:
    """What ``stylize`` and ``optimize_image`` return.

    image: float32 (1, 3, H, W) in the spec's input range (clamped to it).
    losses: total loss after 0, 1, ..., ``steps_done`` steps (``losses[0]`` is the
        initial loss, ``losses[-1]`` the final one): one more than ``steps_done``.
    step_seconds: wall time of each step (one loss-and-gradient evaluation, or
        several for L-BFGS's line search, plus the update), saving excluded.
    stopped: "steps" (all steps done), "stop_below" (the loss fell below it) or
        "interrupted" (``stop()`` returned True; ``terms`` is then empty and
        ``losses`` ends with the loss at the start of the last step, or is empty
        when no step ran).
    evaluations: loss-and-gradient evaluations in all (L-BFGS may do several a step).
    saved: paths written by ``save_every``, in order.
    terms: every term of the returned image ("content.<l>", "style.<l>", "total"),
        unweighted except "total".
    """

    image: np.ndarray
    losses: list[float]
    step_seconds: list[float]
    stopped: str
    evaluations: int = 0
    saved: list[str] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)
    input_range: str = "0,1"
    model_path: str | None = None
    providers: list[str] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.step_seconds)

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of a step (0 when no step ran)."""
        return float(np.median(self.step_seconds)) if self.step_seconds else 0.0


def check_options(steps: int, optimizer: str, lr: float | None, init: str,
                   stop_below: float | None, save_every: int | None, save_path: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} is not accepted; accepted: an integer >= 1.")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is not accepted; accepted: {', '.join(OPTIMIZERS)}.")
    if init not in INITS:
        raise ConfigError(f"init={init!r} is not accepted; accepted: {', '.join(INITS)}.")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr={lr!r} is not accepted; accepted: a finite number > 0.")
    if stop_below is not None and not (isinstance(stop_below, (int, float)) and math.isfinite(stop_below)):
        raise ConfigError(f"stop_below={stop_below!r} is not accepted; accepted: a finite number.")
    if save_every is not None:
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ConfigError(f"save_every={save_every!r} is not accepted; accepted: an integer >= 1.")
        if save_path is None:
            raise ConfigError("save_every= needs save_path=, the image file to write (it may "
                              "contain {step}, e.g. 'out-{step:04d}.png', to keep every save).")
