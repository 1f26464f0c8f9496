"""The optimization loop: descend a differentiable loss over the pixels of an image
with Adam or L-BFGS, clamped to the input range, stopping after ``steps``, below
``stop_below`` or when asked, saving every ``save_every`` steps; guard.py
ends a run that cannot succeed."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from .config import DEFAULT_LR, STALL_STEPS, Progress, StylizeResult, check_options
from .guard import Guard as _Guard
from ..spec import INPUT_RANGES


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

    from ..images import save_image
    from .savepaths import check_save_path

    check_options(steps, optimizer, lr, "content", stop_below, save_every, save_path)
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
