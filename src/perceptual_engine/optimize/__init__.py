"""Image optimization (Gatys et al. 2016): ``stylize``, from a content and a style
image to the optimized one, with the model it runs.

``stylize(content, style)`` starts from the content image (or noise) and descends
the perceptual loss of a cached target graph with gradient (``graph="target"``,
``grad=True``, exported once into the model cache): each step is one engine run
that returns the loss and ∂loss/∂x, then one optimizer update of the pixels,
which are clamped to the input range afterwards.

``optimize_image(loss_module, x0)`` is the loop alone, for any module whose
``forward(x)["total"]`` is differentiable with respect to x after ``set_target``
(``EnginePerceptualLoss`` or ``TorchPerceptualLoss``).

The parts: config.py (the defaults, after Gatys, Ecker and Bethge, the option
checks, StylizeResult), loop.py (``optimize_image``: the loop, Adam / L-BFGS,
stopping, saves), guard.py (what ends a run that cannot succeed),
images.py (``prepare_images``). Their names are re-exported here
(``optimize.CONTENT_LAYER``, ``optimize.optimize_image``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from .config import (CONTENT_LAYER, DEFAULT_GRAM, DEFAULT_LR, DEFAULT_POOLING,
                              DEFAULT_STYLE_WEIGHT, GATYS_LAYERS, INITS, OPTIMIZERS, STALL_STEPS,
                              STYLE_LAYERS, Progress, StylizeResult, check_options, default_loss,
                              gatys_spec)
from .images import prepare_images
from .loop import optimize_image
from ..spec import INPUT_RANGES, FeatureSpec, LossConfig

__all__ = [
    "stylize", "check_model",
    # config.py
    "STYLE_LAYERS", "CONTENT_LAYER", "GATYS_LAYERS", "DEFAULT_STYLE_WEIGHT", "DEFAULT_POOLING",
    "DEFAULT_GRAM", "STALL_STEPS", "OPTIMIZERS", "INITS", "DEFAULT_LR", "Progress",
    "gatys_spec", "default_loss", "StylizeResult",
    "optimize_image",  # loop.py
    "prepare_images",  # images.py
]


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
    check_options(steps, optimizer, lr, init, stop_below, save_every, save_path)
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
    from ..runtime.loss import on_engine_device
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
    from ..runtime import read_info

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
    from ..datasets.cache import ensure_model, models_dir

    entry = ensure_model(spec, loss, dtype=dtype, graph="target", grad=True,
                         folder=models_dir(cache_dir), say=say)
    return entry.path


def _engine_loss(path: str, device: str, precision: str = "auto") -> Any:
    from ..runtime.loss import EnginePerceptualLoss, stylize_options

    # check_range off: L-BFGS's line search evaluates trial points beyond the range
    # before the step is clamped; that is intended, not a caller's mistake.
    return EnginePerceptualLoss(path, device=device, precision=precision,
                                options=stylize_options(device), check_range=False)
