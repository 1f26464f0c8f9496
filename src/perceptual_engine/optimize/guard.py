"""The checks that keep an image optimization honest: a run whose loss, gradient,
optimizer state or image stops being finite, or whose image cannot move, ends with
an OptimizationError that says why and what to change, never with "done".

Why each can happen, with float32 pixels and losses:
- loss weights so large that the weighted loss (or its gradient) overflows;
- Adam's running average of the squared gradient overflows (|g| > ~1.8e19) while
  the gradient is finite: every update is then m / sqrt(inf) = 0, and the image
  never moves, silently;
- L-BFGS's line search, with a large lr, tries pixels far outside the input range
  (they are clamped only after the step) where the network overflows;
- weights so small that every update rounds away against the pixels' values.

The messages leave the names of the remedies open ({lr}, {weights}, {init}): the
API names its arguments, the command line its flags (OptimizationError.wording).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import NonFiniteError, OptimizationError

# Pixels this far outside the input range can only be a line search's trial point.
_OUTSIDE = 1e-3


class Guard:
    """The checks of one run; ``step`` (1-based) is set by the loop before each step."""

    def __init__(self, optimizer: str, lr: float, lo: float, hi: float) -> None:
        self.optimizer, self.lr, self.lo, self.hi = optimizer, lr, lo, hi
        self.step = 0

    # -- after an evaluation -------------------------------------------------------
    def loss(self, evaluate: Callable[[], Any], x: Any) -> Any:
        """``evaluate()`` (the summed total at x), refused when it is not finite."""
        import torch

        try:
            value = evaluate()
        except NonFiniteError as exc:  # the engine's own check of its outputs
            raise self._not_finite("loss", x) from exc
        if not bool(torch.isfinite(value.detach())):
            raise self._not_finite("loss", x)
        return value

    def gradient(self, x: Any, loss: float) -> None:
        import torch

        if x.grad is not None and not bool(torch.isfinite(x.grad).all()):
            raise self._not_finite("gradient", x, loss)

    def _not_finite(self, what: str, x: Any, loss: float | None = None) -> OptimizationError:
        import torch

        with torch.no_grad():
            xs = x.detach()
            lo, hi = float(xs.min()), float(xs.max())
        where = f"at step {self.step}"
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < self.lo - _OUTSIDE \
                or hi > self.hi + _OUTSIDE:
            # Only L-BFGS evaluates off the clamped image: its line search's trial points.
            return OptimizationError(
                f"the {what} is not finite {where}, where L-BFGS's line search tried pixels in "
                f"[{lo:.3g}, {hi:.3g}], far outside the input range [{self.lo:g}, {self.hi:g}]: "
                f"its steps are too large for this loss",
                f"Lower {{lr}} (now {self.lr:g}).", step=self.step)
        of = f" (loss {loss:.4g})" if loss is not None else ""
        return OptimizationError(
            f"the {what} is not finite {where}{of}, with the pixels in the input range: the "
            "weighted loss overflows float32",
            "Lower {weights}: divide them all by the same factor (e.g. 1e6), which keeps "
            "their balance.", step=self.step)

    # -- after an update -----------------------------------------------------------
    def state(self, state: dict, x: Any, loss: float) -> None:
        """The optimizer's state and the updated image, refused when not finite."""
        import torch

        bad = [k for k, v in state.items() if not _finite(v)]
        if not bad and bool(torch.isfinite(x.detach()).all()):
            return
        g = _largest(x.grad)
        if self.optimizer == "adam" and "exp_avg_sq" in bad and math.isfinite(g):
            raise OptimizationError(
                f"Adam's running average of the squared gradient overflowed float32 at step "
                f"{self.step} (largest |gradient| {g:.3g}, loss {loss:.4g}), so every update "
                "would be 0 and the image could not move",
                f"Lower {{weights}}: divide them all by {_power_of_ten(g):g} or more (one factor "
                "for all keeps their balance).", step=self.step)
        what = f"{'Adam' if self.optimizer == 'adam' else 'L-BFGS'}'s state ({', '.join(bad)})" \
            if bad else "the image"
        fix = (f"Lower {{weights}}: divide them all by {_power_of_ten(g):g} or more."
               if math.isfinite(g) and g > 1e15 else f"Lower {{lr}} (now {self.lr:g}) or {{weights}}.")
        raise OptimizationError(f"{what} is not finite after step {self.step} (largest |gradient| "
                                f"{g:.3g}, loss {loss:.4g})", fix, step=self.step)

    def stalled(self, done: int, loss: float, x: Any, proposed: bool) -> OptimizationError:
        """The image has not changed in ``done`` steps although ``loss`` > 0."""
        if proposed:
            return OptimizationError(
                f"the image has not changed in {done} step(s) although the loss is {loss:.4g}: "
                "every update pushed the pixels out of the input range and was clamped back",
                "Start from another image ({init}) or change {weights}.", step=done)
        return OptimizationError(
            f"the image has not changed in {done} step(s) although the loss is {loss:.4g}, not 0: "
            f"the updates (largest |gradient| {_largest(x.grad):.3g}) are below float32's "
            "resolution of the pixels",
            "Raise {weights} (multiply them all by the same factor, e.g. 1e6) or {lr}.", step=done)


def _finite(v: Any) -> bool:
    import torch

    if isinstance(v, torch.Tensor):
        return not v.is_floating_point() or bool(torch.isfinite(v).all())
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):  # L-BFGS's history: only the newest entry is new
        return not v or _finite(v[-1])
    return True


def _largest(g: Any) -> float:
    return float(g.detach().abs().max()) if g is not None else float("nan")


def _power_of_ten(g: float) -> float:
    """A factor that brings |g| to 1 or below."""
    return 10.0 ** max(1, math.ceil(math.log10(max(g, 1.0))))
