"""Image optimization (Gatys et al. 2016): the loop, its optimizers and stopping rules.

``stylize(content, style)`` starts from the content image (or noise) and descends
the perceptual loss of a cached target graph with gradient (``graph="target"``,
``grad=True``, exported once into the model cache): each step is one engine run
that returns the loss and ∂loss/∂x, then one optimizer update of the pixels,
which are clamped to the input range afterwards.

``optimize_image(loss_module, x0)`` is the loop alone, for any module whose
``forward(x)["total"]`` is differentiable with respect to x after ``set_target``
(``EnginePerceptualLoss`` or ``TorchPerceptualLoss``).

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
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ConfigError
from .optimize_guard import Guard as _Guard
from .spec import INPUT_RANGES, FeatureSpec, LossConfig

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


def _check_options(steps: int, optimizer: str, lr: float | None, init: str,
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


def optimize_image(loss_module: Any, x0: Any, *, steps: int = 300, optimizer: str = "adam",
                   lr: float | None = None, input_range: str = "0,1",
                   stop_below: float | None = None, save_every: int | None = None,
                   save_path: str | os.PathLike | None = None,
                   progress: Progress | None = None,
                   on_save: Callable[[int, str], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> StylizeResult:
    """Minimize ``loss_module(x)["total"].sum()`` over the pixels of x, from ``x0``.

    loss_module: its target already set; ``forward(x)`` returns a dict whose
        "total" (N,) is differentiable with respect to x.
    x0: float32 (1, 3, H, W) array or tensor in ``input_range``; not modified.
    optimizer: "adam" (lr default 0.02 per unit of the input range's width) or
        "lbfgs" (lr 1, one L-BFGS iteration per step with a strong-Wolfe line search,
        so a step may evaluate the loss more than once).
    stop_below: stop as soon as the loss is at or below it.
    save_every, save_path: write the image to ``save_path`` (atomically; PNG or any
        format Pillow writes) after every ``save_every`` steps. ``{step}`` in the file
        name is replaced by the step (``"out-{step:04d}.png"``); other braces are
        refused, literal ones are written ``{{`` ``}}`` (see ``savepaths``). Checked
        before the first step.
    progress: called after every step as ``progress(step, steps, loss)``, loss being
        the one evaluated at the start of that step (before its update).
    on_save: called after each save as ``on_save(step, path)``.
    stop: polled before every step; when it returns True the loop ends there and
        returns the image so far (stopped="interrupted"). A signal handler that only
        sets a flag for it never interrupts a step inside native code.
    Pixels are clamped to ``input_range`` after every update.

    Raises OptimizationError when the loss, the gradient, the optimizer's state or
    the image stops being finite, or when the image has not changed after
    ``STALL_STEPS`` steps although the loss is above 0: a run that cannot move is
    never reported as done.
    """
    import torch

    from .images import save_image
    from .savepaths import check_save_path

    _check_options(steps, optimizer, lr, "content", stop_below, save_every, save_path)
    if input_range not in INPUT_RANGES:
        raise ConfigError(f"input_range={input_range!r} is not accepted; accepted: "
                          f"{', '.join(map(repr, INPUT_RANGES))}.")
    if save_every is not None:
        save_path = check_save_path(save_path, steps=range(save_every, steps + 1, save_every))
    lo, hi = INPUT_RANGES[input_range]
    lr = lr if lr is not None else DEFAULT_LR[optimizer] * (1.0 if optimizer == "lbfgs" else hi - lo)
    start = x0.detach().clone() if isinstance(x0, torch.Tensor) else torch.from_numpy(np.array(x0))
    x = start.to(torch.float32).clamp_(lo, hi).requires_grad_(True)
    first = x.detach().clone()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([x], lr=lr)
    else:
        # Tolerances 0: the loop decides when to stop (steps, stop_below); L-BFGS's own
        # tests on the gradient's size would end it silently on a small-valued loss.
        def make_lbfgs() -> torch.optim.Optimizer:
            return torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=50,
                                     line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                     tolerance_change=0.0)

        opt = make_lbfgs()
    guard = _Guard(optimizer, lr, lo, hi)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad(set_to_none=True)
        value = guard.loss(lambda: loss_module(x)["total"].sum(), x)
        value.backward()
        guard.gradient(x, float(value.detach()))
        return value

    losses: list[float] = []
    seconds: list[float] = []
    saved: list[str] = []

    def first_value(v: torch.Tensor) -> None:
        # The first evaluation of a step is at the current x: the loss after the steps
        # done so far. At or below stop_below, stop before x moves (L-BFGS evaluates
        # inside step(), so the stop is raised from there, before any update).
        losses.append(float(v.detach()))
        if stop_below is not None and losses[-1] <= stop_below:
            raise _Stop

    stopped = "steps"
    moved = proposed = False  # the image changed; an update changed it before the clamp
    for step in range(steps):
        if stop is not None and stop():
            stopped = "interrupted"
            break
        guard.step = step + 1
        t0 = time.perf_counter()
        try:
            if optimizer == "adam":
                first_value(closure())
                opt.step()
            else:
                n_before = evaluations

                def recorded() -> torch.Tensor:
                    v = closure()
                    if evaluations == n_before + 1:
                        first_value(v)
                    return v

                opt.step(recorded)
            guard.state(opt.state[x], x, losses[-1])
            if optimizer == "lbfgs" and float(opt.state[x].get("t", 1.0)) == 0.0:
                # The line search found no step (max pooling makes the loss only
                # piecewise smooth): the memory misleads, so start it afresh.
                opt = make_lbfgs()
        except _Stop:
            stopped = "stop_below"
            break
        proposed = proposed or not torch.equal(x.detach(), first)
        with torch.no_grad():
            x.clamp_(lo, hi)
        seconds.append(time.perf_counter() - t0)
        done = step + 1
        moved = moved or not torch.equal(x.detach(), first)
        if not moved and losses[0] > 0 and done >= min(steps, STALL_STEPS):
            raise guard.stalled(done, losses[0], x, proposed)
        if save_every is not None and done % save_every == 0:
            saved.append(_save(save_image, save_path, x, done, input_range))
            if on_save is not None:
                on_save(done, saved[-1])
        if progress is not None:
            progress(done, steps, losses[-1])
    terms: dict[str, float] = {}
    if stopped != "interrupted":  # the terms of the returned image (and its loss, if not known)
        with torch.no_grad():
            terms = {k: float(v.detach().sum()) for k, v in loss_module(x.detach()).items()}
        evaluations += 1
        if len(losses) == len(seconds):
            losses.append(terms["total"])
    image = x.detach().cpu().numpy().astype(np.float32, copy=True)
    return StylizeResult(image, losses, seconds, stopped, evaluations, saved, terms, input_range)


class _Stop(Exception):
    """The loss reached stop_below: leave the loop before x moves again."""


def _save(save_image: Callable[..., None], path: str, x: Any, step: int, input_range: str) -> str:
    from .savepaths import expand

    target = expand(path, step)
    save_image(target, x.detach().cpu().numpy()[0], input_range=input_range)
    return target


def prepare_images(content: Any, style: Any, *, size: int | None = None,
                   style_size: int | None = None, min_size: int = 1,
                   input_range: str = "0,1") -> tuple[np.ndarray, np.ndarray]:
    """(content, style) as float32 (1, 3, H, W) arrays in ``input_range``.

    content, style: image file paths, or arrays (3, H, W) / (1, 3, H, W) already in
        ``input_range``. size: the content image's longest side after resizing
        (aspect ratio kept; None keeps its size). style_size: the style image's
        longest side; None (default) resizes it to the content image's H x W.
    Raises ConfigError when a side ends up below ``min_size`` (the deepest layer's).
    """
    from .images import resize

    lo, hi = INPUT_RANGES[input_range]
    c, s = (_unit(v, what, lo, hi) for v, what in ((content, "content"), (style, "style")))
    for name, value in (("size", size), ("style_size", style_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value!r} is not accepted; accepted: an integer >= 1 "
                              "(pixels of the longest side).")
    if size is not None:
        c = resize(c, _fit(c.shape[1:], size))
    s = resize(s, c.shape[1:] if style_size is None else _fit(s.shape[1:], style_size))
    for name, img, arg in (("content", c, "size="), ("style", s, "style_size=")):
        h, w = img.shape[1:]
        if min(h, w) < min_size:
            raise ConfigError(
                f"the {name} image would be {h}x{w} pixels, below {min_size}, the smallest side "
                f"the deepest layer accepts; give a larger {arg} (or a shallower deepest layer).")
    return (lo + (hi - lo) * c)[None], (lo + (hi - lo) * s)[None]


def _fit(hw: tuple[int, ...], longest: int) -> tuple[int, int]:
    h, w = hw
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _unit(value: Any, what: str, lo: float, hi: float) -> np.ndarray:
    """A path or an array in [lo, hi] -> (3, H, W) float32 in [0, 1]."""
    from .errors import InputError
    from .images import decode

    if isinstance(value, (str, os.PathLike)):
        return decode(value)
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != 3 or not np.isfinite(arr).all():
        raise InputError(f"the {what} image has shape {arr.shape} (or non-finite values); "
                         "accepted: a file path, or a finite float array (3, H, W) or (1, 3, H, W).")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def stylize(content: Any, style: Any, *, spec: FeatureSpec | None = None,
            loss: LossConfig | None = None, model: str | os.PathLike | None = None,
            steps: int = 300, optimizer: str = "adam", lr: float | None = None,
            init: str = "content", stop_below: float | None = None, size: int | None = None,
            style_size: int | None = None, device: str = "auto", dtype: str = "float32",
            seed: int = 0, precision: str = "auto",
            save_every: int | None = None, save_path: str | os.PathLike | None = None,
            progress: Progress | None = None, on_save: Callable[[int, str], None] | None = None,
            cache_dir: str | None = None,
            say: Callable[[str], None] | None = None, overwrite_input: bool = False,
            stop: Callable[[], bool] | None = None) -> StylizeResult:
    """Optimize an image to have ``content``'s features and ``style``'s Grams.

    content, style: image paths, or float arrays (3, H, W) / (1, 3, H, W) in the
        spec's input range. size: longest side of the result in pixels (default:
        the content image's size); the style image is resized to the result's
        H x W unless ``style_size`` gives its own longest side.
    spec, loss: default ``gatys_spec()`` (ImageNet VGG19 to relu5_1) and
        ``default_loss(spec)`` (content relu4_2, style relu1_1..relu5_1, gram "hw").
        The target graph with gradient is exported once into the model cache
        (``cache_dir``, default that of the CLI). model: an exported target model
        with gradient to use instead (its metadata gives spec and loss).
    init: "content" (start from the content image) or "noise" (uniform in the input
        range, seeded by ``seed``). save_path: checked before anything runs (see
        ``savepaths``); it may not be the content or style file unless
        ``overwrite_input``. Other options: see ``optimize_image``.
    device: the Engine's device ("auto", "cpu", "cuda", "tensorrt", "openvino"); precision:
        the Engine's ("auto", "f32", "bf16"; see docs/openvino.md). dtype: the
        exported network's precision ("float32" or "float16"; see export_onnx).
    Returns a StylizeResult: the image (1, 3, H, W) float32 in the input range,
    the loss after every step and each step's time.
    """
    _check_options(steps, optimizer, lr, init, stop_below, save_every, save_path)
    if save_every is not None:
        from .savepaths import check_save_path

        save_path = check_save_path(save_path, steps=range(save_every, steps + 1, save_every),
                                    inputs=(content, style), overwrite_input=overwrite_input)
    say = say or (lambda msg: None)
    if model is not None:
        if spec is not None or loss is not None:
            raise ConfigError("model= carries its own spec and loss; drop spec=/loss=, or drop "
                              "model= to export one from them.")
        spec = check_model(model).spec
    else:
        spec = spec if spec is not None else gatys_spec()
        loss = loss if loss is not None else default_loss(spec)
        loss.check_against(spec)
    # Images first: a bad file or size fails in a moment, before any export.
    c, s = prepare_images(content, style, size=size, style_size=style_size,
                          min_size=spec.min_size, input_range=spec.input_range)
    path = os.fspath(model) if model is not None else _cached_model(spec, loss, dtype, cache_dir, say)
    module = _engine_loss(path, device, precision)
    module.set_target(content=c, style=s)
    from .runtime.loss import on_engine_device
    if init == "content":
        x0 = c.copy()
    else:
        lo, hi = INPUT_RANGES[spec.input_range]
        x0 = np.random.default_rng(seed).uniform(lo, hi, c.shape).astype(np.float32)
    result = optimize_image(module, on_engine_device(module.engine, x0), steps=steps, optimizer=optimizer, lr=lr,
                            input_range=spec.input_range, stop_below=stop_below,
                            save_every=save_every, save_path=save_path, progress=progress,
                            on_save=on_save, stop=stop)
    result.model_path = path
    result.providers = list(module.engine.providers)
    return result


def check_model(model: str | os.PathLike, *, command: bool = False) -> Any:
    """The ModelInfo of ``model`` if it is a target graph with its gradient (what the loop
    runs); else ConfigError with the export that makes one. ``command``: word it for the
    ``stylize`` command (its flags) instead of the API."""
    from .runtime import read_info

    path = os.fspath(model)
    info = read_info(path)
    if info.graph == "target" and info.grad:
        return info
    kind = f"a {info.graph} graph" + ("" if info.grad else " without gradient")
    if command:
        fix = ("Export one with perceptual-engine export --graph target --grad -o FILE.onnx "
               "(with the spec and loss flags), or drop --model to export one into the cache.")
    else:
        fix = ("Export one with export_onnx(spec, path, graph='target', loss=loss, grad=True), "
               "or drop model= to export one into the cache.")
    raise ConfigError(f"{'--model' if command else 'model='} {path!r} is {kind}; stylize needs a "
                      f"target graph with its gradient (grad.x). {fix}")


def _cached_model(spec: FeatureSpec, loss: LossConfig | None, dtype: str,
                  cache_dir: str | None, say: Callable[[str], None]) -> str:
    from .datasets.cache import ensure_model, models_dir

    entry = ensure_model(spec, loss, dtype=dtype, graph="target", grad=True,
                         folder=models_dir(cache_dir), say=say)
    return entry.path


def _engine_loss(path: str, device: str, precision: str = "auto") -> Any:
    from .runtime.loss import EnginePerceptualLoss, stylize_options

    # check_range off: L-BFGS's line search evaluates trial points beyond the range
    # before the step is clamped; that is intended, not a caller's mistake.
    return EnginePerceptualLoss(path, device=device, precision=precision,
                                options=stylize_options(device), check_range=False)
