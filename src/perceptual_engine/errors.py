"""The exception hierarchy: one root, a few subclasses by what went wrong.

Every message names what was received, what is accepted and what to do, so the
command line can print it as one line and stop.
"""
from __future__ import annotations


class PerceptualError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigError(PerceptualError, ValueError):
    """A FeatureSpec, LossConfig or option has an invalid value."""


class InputError(PerceptualError, ValueError):
    """An input array or tensor has the wrong rank, dtype, shape or values."""


class NonFiniteError(InputError):
    """Some samples' distances are not finite. ``out`` holds every term as computed
    (the finite samples are valid), ``bad`` the indices of the others. ``inputs``:
    True when those samples' inputs held NaN/Inf (they were not computed and their
    terms are NaN), False when the outputs overflowed."""

    def __init__(self, message: str, out: dict, bad: list[int], inputs: bool = False) -> None:
        super().__init__(message)
        self.out, self.bad, self.inputs = out, bad, inputs


class NonFiniteInputError(InputError):
    """An input holds NaN or Inf; ``bad`` lists the sample indices (axis 0) that do."""

    def __init__(self, message: str, name: str, bad: list[int]) -> None:
        super().__init__(message)
        self.name, self.bad = name, bad


class NotSupportedError(PerceptualError, NotImplementedError):
    """A request outside what the library computes, e.g. a second derivative through
    an exported gradient graph."""


class OptimizationError(PerceptualError, ArithmeticError):
    """Image optimization cannot go on: its loss, gradient, optimizer state or image
    is not finite, or the image cannot move. ``step`` is the step it happened in
    (1-based); ``what`` says what happened; ``fix`` is the remedy, with ``{lr}``,
    ``{weights}`` and ``{init}`` standing for the caller's names of the learning rate,
    the loss weights and the start (``wording(lr=..., weights=..., init=...)`` fills them in: the command line names
    its flags, the API its arguments)."""

    API_NAMES = {"lr": "lr=", "weights": "the loss weights (LossConfig content=/style=)",
                 "init": "init='noise'"}

    def __init__(self, what: str, fix: str, *, step: int) -> None:
        self.what, self.fix, self.step = what, fix, step
        super().__init__(self.wording(**self.API_NAMES))

    def wording(self, **names: str) -> str:
        return f"{self.what}. {self.fix.format(**names)}"


class WeightsError(PerceptualError):
    """Model weights could not be obtained or do not fit the architecture."""


class LinearWeightsError(WeightsError):
    """LPIPS linear weights (the 1x1 heads, not the VGG trunk) could not be read or checked."""


class DistsWeightsError(WeightsError):
    """DISTS alpha/beta (the head, not the VGG trunk) could not be read or checked."""


class WrongTrunkError(WeightsError, ConfigError):
    """A weights file that fits another registered trunk than the spec's: the arch (or
    the LPIPS net) asked for is the thing to change, so it is also a ConfigError."""


class WrongNetError(LinearWeightsError, ConfigError):
    """LPIPS linear weights of another net (alex, squeeze, vgg) than the spec's."""


class ModelError(PerceptualError):
    """An ONNX file is missing, corrupt, foreign or inconsistent with its metadata."""


class DeviceError(PerceptualError, RuntimeError):
    """The requested device or execution provider cannot be used."""


class PrecisionError(DeviceError):
    """A backend's numbers are outside the accuracy tier of the precision asked for.

    ``errors``: {output: relative error} against the fp32 reference (docs/openvino.md)."""

    def __init__(self, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})


class ImageError(PerceptualError):
    """An image file could not be read or converted."""


class ExportError(PerceptualError, RuntimeError):
    """Export or its verification failed; the destination was left untouched."""


class MemoryBudgetError(InputError):
    """A call's estimated peak memory exceeds the budget; refused before it ran.

    ``estimate`` and ``budget`` are in bytes."""

    def __init__(self, message: str, *, estimate: int, budget: int) -> None:
        super().__init__(message)
        self.estimate, self.budget = estimate, budget


class OutOfMemoryError(PerceptualError, MemoryError):
    """ONNX Runtime (or CUDA) failed to allocate memory during a call.

    ``estimate``: the call's estimated peak in bytes, when known."""

    def __init__(self, message: str, *, estimate: int | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate


class OutputError(PerceptualError):
    """A result file could not be written, or was changed by someone else while being written."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message`` of any exception, never failing.

    Some exceptions carry no message at all (``EOFError()`` from a 0-byte pickle):
    ``str(exc).splitlines()[0]`` would raise IndexError inside an error handler.
    """
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else "no message"
    return f"{type(exc).__name__}: {text[:limit]}"
