"""A backend's numbers against the fp32 reference (ONNX Runtime CPU), once per model.

Tiers (relative errors, on seeded uniform inputs of 2 samples at an odd size):
- taps (features outputs, ``feature.*``, ``gram.*``, ``spatial``): max|a − b| / max|b| over
  the whole output;
- ``total``: max over samples of |a_n − b_n| / |b_n|;
- terms (``content.*``, ``style.*``, ``lpips.*``, any other per-sample output): as total;
- ``grad.x``: max over samples of ‖a_n − b_n‖₂ / ‖b_n‖₂.

A model outside its tier is refused (PrecisionError), never run with a silent wrong
number. Results are cached per process by file identity (path, device, inode, size,
mtime and ctime, which no one can set back) and precision, so a second Engine on the
same file does not check again, and a file rewritten in place is checked anew.

bf16 and small distances. bf16's rounding follows the features, not their difference:
for near-duplicate pairs it is as large as the distance itself (a total 10x off at
noise 1e-3). So the bf16 check adds a ladder of near-duplicate pairs (y plus uniform
noise of NEAR_LEVELS of the input range) to the unrelated ones, and calibrates a
threshold on ``total``: twice the largest reference total among near-duplicate pairs
whose bf16 total is more than half its tier off, or a term more than its tier
(CALIBRATED). The unrelated pairs must be within the tier in bf16 alone. The backend recomputes in f32 every sample
whose bf16 total is below it (``calibrate``), and the check then runs that policy on
every pair, unrelated and near-duplicate, against the tier.
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

# Noise amplitudes (fractions of the input range) of the near-duplicate pairs of the
# bf16 check: from where bf16 is 10x off to where it is within its tier.
NEAR_LEVELS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 6e-1)

# The outputs the threshold is calibrated on, and the fraction of their tier a bf16 sample
# may use before it is recomputed: total with a margin; terms (whose tier is loose because
# style terms are several percent off on any pair) at their tier. grad.x is not: a gradient
# graph outside its tier in bf16 is refused (precision "auto" gives it f32).
CALIBRATED = {"total": 0.5, "terms": 1.0}

# key -> (errors, bf16 threshold), or (errors, the PrecisionError) for a refused model
_cache: dict[tuple, tuple[dict[str, float], Any]] = {}
_lock = threading.Lock()


def identity(path: str) -> tuple:
    """A file's identity for the per-process cache: a rewrite in place changes st_ctime_ns
    even when size and mtime are restored."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind(name: str) -> str:
    if name == "total":
        return "total"
    if name == "grad.x":
        return "grad"
    if name.startswith(("feature.", "gram.")) or name == "spatial" or "." not in name:
        return "taps"  # features graphs name their outputs by layer ("relu1_2")
    return "terms"


def sample_errors(kind: str, got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """(N,) relative errors per sample of a per-sample output (total, terms, grad)."""
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if kind == "grad":
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


def error(kind: str, got: np.ndarray, want: np.ndarray) -> float:
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if kind == "taps":
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    if kind == "grad":
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)).max())
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-30)).max())


def check_inputs(info: Any, reference: Callable[[Mapping[str, np.ndarray], list[str]], dict],
                 near: tuple[float, ...] = ()) -> dict:
    """Seeded inputs for every input of the model; target inputs computed by the reference.
    Two unrelated pairs, then one near-duplicate pair per level of ``near``: x is y (the
    target image on style/target graphs) plus uniform noise of that fraction of the range."""
    spec = info.spec
    side = max(2 * spec.min_size, 64) + 3  # odd, and deep enough for every tap
    lo, hi = INPUT_RANGES[spec.input_range]
    rng = np.random.default_rng(20260)
    x = rng.uniform(lo, hi, (2, 3, side, side + 4)).astype(np.float32)
    y = rng.uniform(lo, hi, (2, 3, side, side + 4)).astype(np.float32)
    if near:
        base = y[np.arange(len(near)) % 2] if "y" in info.input_names else np.repeat(y[:1], len(near), 0)
        noise = rng.uniform(-1, 1, base.shape) * np.array(near)[:, None, None, None] * (hi - lo)
        x = np.concatenate([x, np.clip(base + noise, lo, hi).astype(np.float32)])
        y = np.concatenate([y, base])
    feeds = {"x": x}
    if "y" in info.input_names:
        feeds["y"] = y
    targets = [n for n in info.input_names if n.startswith("target.")]
    if targets:
        zeros = {}
        for name in targets:
            kind, layer = name.split(".", 2)[1:]
            r = _layers.resolve(spec.arch, layer)
            zeros[name] = np.zeros((1, r.channels, r.size(side), r.size(side + 4))
                                   if kind == "content" else (1, r.channels, r.channels), np.float32)
        wanted = [n[len("target."):].replace("content.", "feature.", 1) for n in targets]
        got = reference({"x": y[:1], **zeros}, wanted)
        feeds.update({t: got[w] for t, w in zip(targets, wanted)})
    return feeds


def verify(path: str, info: Any, precision: str, version: str,
           run: Callable[[Mapping[str, np.ndarray], list[str]], dict],
           calibrate: Callable[[float], None] | None = None) -> dict[str, float]:
    """{output: error} of ``run`` against ONNX Runtime CPU fp32, or PrecisionError.

    calibrate: given the bf16 threshold on ``total`` below which the backend recomputes
    a sample in f32 (0: none), before ``run`` is checked with it (bf16 graphs with a total).
    """
    key = (identity(path), precision, version)
    with _lock:
        if key in _cache:
            errors, near = _cache[key]
            if isinstance(near, PrecisionError):  # refused before: refused again, not re-checked
                raise PrecisionError(str(near), errors)
            if calibrate is not None:
                calibrate(near)
            return errors
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def reference(feeds, names):
        return dict(zip(names, ref.run(list(names), dict(feeds))))

    names = list(info.output_names)
    tier = TIERS[precision]
    ladder = precision == "bf16" and "total" in names and calibrate is not None
    feeds = check_inputs(info, reference, NEAR_LEVELS if ladder else ())
    want = reference(feeds, names)
    threshold = 0.0
    bad: dict[str, float] = {}
    if ladder:
        calibrate(0.0)
        raw = run(feeds, names)
        # The unrelated pairs must be in the tier in bf16 alone: a model that needs f32 on
        # ordinary pairs is refused (precision "auto" then runs f32), not recomputed whole.
        plain = {n: error(_kind(n), raw[n][:2], want[n][:2]) for n in names}
        bad = {n: e for n, e in plain.items() if not e <= getattr(tier, _kind(n))}
        ref = np.asarray(want["total"], np.float64)
        off = np.zeros(len(ref), bool)
        for n in names:  # off: total beyond half its tier, or a term beyond its tier
            kind = _kind(n)
            if kind in CALIBRATED:
                off |= sample_errors(kind, raw[n], want[n]) > CALIBRATED[kind] * getattr(tier, kind)
        off[:2] = False
        threshold = float(2 * ref[off].max()) if off.any() else 0.0
        calibrate(threshold)
    if bad:
        errors = plain
    else:
        got = run(feeds, names)
        errors = {n: error(_kind(n), got[n], want[n]) for n in names}
        bad = {n: e for n, e in errors.items() if not e <= getattr(tier, _kind(n))}
    if bad:
        shown = ", ".join(f"{n} {e:.2g} (tier {getattr(tier, _kind(n)):.0e})"
                          for n, e in list(bad.items())[:4])
        refusal = PrecisionError(
            f"OpenVINO {precision} is outside its accuracy tier on {path!r} against ONNX Runtime fp32: "
            f"{shown}. The model is refused rather than run with wrong numbers; use precision='f32' "
            "or device='cpu'. Tiers: docs/openvino.md.", errors)
        with _lock:
            _cache[key] = (errors, refusal)
        raise refusal
    with _lock:
        _cache[key] = (errors, threshold)
    return errors
