"""A backend's numbers against the fp32 reference (ONNX Runtime CPU), once per model.

Tiers (relative errors, on seeded uniform inputs of 2 samples at an odd size):
- taps (features outputs, ``feature.*``, ``gram.*``, ``spatial``): max|a − b| / max|b| over
  the whole output;
- ``total``: max over samples of |a_n − b_n| / |b_n|;
- terms (``content.*``, ``style.*``, ``lpips.*``, any other per-sample output): as total;
- ``grad.x``: max over samples of ‖a_n − b_n‖₂ / ‖b_n‖₂.

A model outside its tier is refused (PrecisionError), never run with a silent wrong
number. Results are cached per process by file identity (path, inode, size, mtime)
and precision, so a second Engine on the same file does not check again.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ... import layers as _layers
from ...errors import PrecisionError
from ...spec import INPUT_RANGES


@dataclass(frozen=True)
class Tier:
    taps: float
    total: float
    terms: float
    grad: float


TIERS = {
    "f32": Tier(taps=1e-4, total=1e-4, terms=1e-4, grad=1e-4),
    # bf16 keeps 8 mantissa bits: taps 2e-2 and total 2e-3 as promised; single style
    # terms were measured up to 6e-2 off (their Grams run in bf16), so terms get 1e-1.
    "bf16": Tier(taps=2e-2, total=2e-3, terms=1e-1, grad=2e-2),
}

_cache: dict[tuple, dict[str, float]] = {}
_lock = threading.Lock()


def identity(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _kind(name: str) -> str:
    if name == "total":
        return "total"
    if name == "grad.x":
        return "grad"
    if name.startswith(("feature.", "gram.")) or name == "spatial" or "." not in name:
        return "taps"  # features graphs name their outputs by layer ("relu1_2")
    return "terms"


def error(kind: str, got: np.ndarray, want: np.ndarray) -> float:
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if kind == "taps":
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    if kind == "grad":
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)).max())
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-30)).max())


def check_inputs(info: Any, reference: Callable[[Mapping[str, np.ndarray], list[str]], dict]) -> dict:
    """Seeded inputs for every input of the model; target inputs computed by the reference."""
    spec = info.spec
    side = max(2 * spec.min_size, 64) + 3  # odd, and deep enough for every tap
    lo, hi = INPUT_RANGES[spec.input_range]
    rng = np.random.default_rng(20260)
    x = rng.uniform(lo, hi, (2, 3, side, side + 4)).astype(np.float32)
    y = rng.uniform(lo, hi, (2, 3, side, side + 4)).astype(np.float32)
    feeds = {"x": x}
    if "y" in info.input_names:
        feeds["y"] = y
    targets = [n for n in info.input_names if n.startswith("target.")]
    if targets:
        zeros = {}
        for name in targets:
            kind, layer = name.split(".", 2)[1:]
            r = _layers.resolve(spec.arch, layer)
            zeros[name] = np.zeros((1, r.channels, side // r.downsample, (side + 4) // r.downsample)
                                   if kind == "content" else (1, r.channels, r.channels), np.float32)
        wanted = [n[len("target."):].replace("content.", "feature.", 1) for n in targets]
        got = reference({"x": y[:1], **zeros}, wanted)
        feeds.update({t: got[w] for t, w in zip(targets, wanted)})
    return feeds


def verify(path: str, info: Any, precision: str, version: str,
           run: Callable[[Mapping[str, np.ndarray], list[str]], dict]) -> dict[str, float]:
    """{output: error} of ``run`` against ONNX Runtime CPU fp32, or PrecisionError."""
    key = (identity(path), precision, version)
    with _lock:
        if key in _cache:
            return _cache[key]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def reference(feeds, names):
        return dict(zip(names, ref.run(list(names), dict(feeds))))

    feeds = check_inputs(info, reference)
    names = list(info.output_names)
    want, got = reference(feeds, names), run(feeds, names)
    tier = TIERS[precision]
    errors = {n: error(_kind(n), got[n], want[n]) for n in names}
    bad = {n: e for n, e in errors.items() if not e <= getattr(tier, _kind(n))}
    if bad:
        shown = ", ".join(f"{n} {e:.2g} (tier {getattr(tier, _kind(n)):.0e})"
                          for n, e in list(bad.items())[:4])
        raise PrecisionError(
            f"OpenVINO {precision} is outside its accuracy tier on {path!r} against ONNX Runtime fp32: "
            f"{shown}. The model is refused rather than run with wrong numbers; use precision='f32' "
            "(--precision f32) or device='cpu'. Tiers: docs/openvino.md.", errors)
    with _lock:
        _cache[key] = errors
    return errors
