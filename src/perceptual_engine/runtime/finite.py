"""NaN and Inf in a distance call: a sample whose input holds them is left out and the
others are computed (their terms scattered back, NaN for the bad ones), and the terms a
call returns are checked finite."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..errors import NonFiniteError, NonFiniteInputError
from ..validate import nonfinite_samples


def distance_finite_samples(distance: Callable[[Any, Any], dict[str, Any]], x: Any, y: Any,
                            exc: NonFiniteInputError) -> dict[str, Any]:
    """``distance`` on the samples of x (and y) whose inputs are finite; raises the
    NonFiniteError naming the others, every term in its ``.out`` (``exc`` if none is)."""
    bad = sorted(set(nonfinite_samples(_host_view(x)))
                 | (set(nonfinite_samples(_host_view(y))) if y is not None else set()))
    n = int(x.shape[0])
    keep = [i for i in range(n) if i not in bad]
    if not keep:
        raise exc
    sub = distance(x[keep], None if y is None else y[keep])
    out = {k: _scatter(v, keep, n) for k, v in sub.items()}
    raise NonFiniteError(
        f"the input of sample(s) {bad} holds NaN or Inf: those were not computed; the other "
        f"{len(keep)} sample(s)' terms are in this error's .out (NaN for the bad ones). "
        "Check those inputs.", out, bad, inputs=True)


def _host_view(v: Any) -> Any:
    """A numpy array or CPU torch tensor as is (CUDA tensors are never scanned)."""
    return v if isinstance(v, np.ndarray) else v.detach()


def _scatter(v: Any, keep: list[int], n: int) -> Any:
    """Rows ``keep`` of an (n, ...) result filled from ``v``, the others NaN."""
    if isinstance(v, np.ndarray):
        full = np.full((n, *v.shape[1:]), np.nan, dtype=v.dtype)
    else:
        import torch

        full = torch.full((n, *v.shape[1:]), float("nan"), dtype=v.dtype, device=v.device)
    full[keep] = v
    return full


def _check_finite(out: Mapping[str, Any]) -> None:
    """NonFiniteError if a sample's total is NaN/Inf. On CUDA, IO binding (iobinding.py)
    has ONNX Runtime copy ``total`` to the host within its run (``host_total``): the check
    reads that, and never copies from the device or synchronizes the host itself."""
    total = out["total"]
    host = getattr(out, "host_total", None)
    if host is not None:
        arr = host
    elif isinstance(total, np.ndarray):
        arr = total
    else:
        arr = total.detach().float().cpu().numpy()
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr)).tolist()
        raise NonFiniteError(f"the distance of sample(s) {bad} is not finite; the inputs hold NaN/Inf "
                             "or overflow the model's precision. Check those inputs (the other "
                             "samples' terms are in this error's .out).", dict(out), bad)

