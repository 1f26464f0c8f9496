"""Input checks shared by the Engine and the reference, before any work is done.

Shape and dtype checks read metadata only. Finiteness and range need a pass over
the data; they run on host arrays (cheap next to a VGG forward) and are skipped
for CUDA tensors, whose results are checked instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, NonFiniteInputError
from .spec import INPUT_RANGES, FeatureSpec

MAX_BATCH_PIXELS = 1 << 27  # N·H·W per call: 134 M, e.g. 64 images of 1448²
RANGE_TOLERANCE = 1e-3


def _describe(x: Any) -> tuple[tuple[int, ...], str, str]:
    """(shape, dtype name, kind) of a numpy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return tuple(x.shape), str(x.dtype), "numpy"
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.device.type == "meta":  # shape only: reading it would raise NotImplementedError
            raise InputError(f"input is a tensor on the meta device, of shape {tuple(x.shape)} "
                             "but without data; accepted: a tensor with data (CPU or CUDA), or "
                             "a numpy array.")
        return tuple(x.shape), str(x.dtype).replace("torch.", ""), "torch"
    raise InputError(
        f"input is a {type(x).__name__}; accepted: a numpy array or torch tensor of shape "
        "(N, 3, H, W). Load files with perceptual_engine.load_image(path)."
    )


def check_tensor(
    x: Any,
    name: str,
    spec: FeatureSpec,
    *,
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
    max_pixels: int | None = MAX_BATCH_PIXELS,
    check_values: bool = True,
    check_range: bool = False,
) -> None:
    """Raise InputError unless ``x`` is a float (N, 3, H, W) batch the network can take."""
    shape, dtype, kind = _describe(x)
    if len(shape) != 4:
        hint = " Add a batch axis: x[None]." if len(shape) == 3 else ""
        raise InputError(f"{name} has shape {shape} (rank {len(shape)}); accepted: rank 4, (N, 3, H, W).{hint}")
    n, c, h, w = shape
    if c != 3:
        hint = ""
        if w in (1, 2, 3, 4) and c not in (1, 2, 3, 4):
            hint = " It looks channels-last (N, H, W, C): transpose with x.transpose(0, 3, 1, 2)."
        elif c in (1, 2, 4):
            hint = " Convert to RGB first (gray: repeat the channel; RGBA: drop or composite alpha)."
        raise InputError(f"{name} has {c} channels (shape {shape}); accepted: 3 (RGB), (N, 3, H, W).{hint}")
    if n == 0 or h == 0 or w == 0:
        raise InputError(f"{name} is empty (shape {shape}); accepted: N, H, W >= 1.")
    if dtype not in dtypes:
        hint = " Divide uint8 images by 255: x.astype(np.float32) / 255." if "int" in dtype else ""
        raise InputError(
            f"{name} has dtype {dtype}; accepted: {', '.join(dtypes)}. Convert it, e.g. "
            f"x.astype(np.float32) or t.float().{hint}"
        )
    if h < spec.min_size or w < spec.min_size:
        raise InputError(
            f"{name} is {h}x{w}, too small for {spec.deepest} ({spec.min_size}x downsampling); "
            f"accepted: height and width >= {spec.min_size}. Resize or pad it, or cut at a "
            "shallower layer."
        )
    if max_pixels is not None and n * h * w > max_pixels:
        raise InputError(
            f"{name} has {n}x{h}x{w} = {n * h * w} pixels, over the budget of {max_pixels}; "
            "split the batch or raise max_pixels."
        )
    if check_values:
        _check_values(x, kind, name, spec, check_range)


def _check_values(x: Any, kind: str, name: str, spec: FeatureSpec, check_range: bool) -> None:
    """Finite values (and within the input range): two passes, min and max, on host data.

    A NaN propagates into both, and an Inf is one of them, so the extremes answer
    finiteness and range together. CUDA tensors are not scanned (a device sync per call).
    """
    if kind == "torch" and x.device.type != "cpu":
        return
    arr = x if kind == "numpy" else x.detach()
    mn, mx = float(arr.min()), float(arr.max())
    if not (np.isfinite(mn) and np.isfinite(mx)):
        bad = nonfinite_samples(arr)
        raise NonFiniteInputError(
            f"{name} contains NaN or Inf values in sample(s) {bad} (of {arr.shape[0]}); accepted: "
            f"finite values. Check the producer of {name}.", name, bad)
    if check_range:
        lo, hi = INPUT_RANGES[spec.input_range]
        if mn < lo - RANGE_TOLERANCE or mx > hi + RANGE_TOLERANCE:
            raise InputError(
                f"{name} has values in [{mn:.4g}, {mx:.4g}], outside the model's input range "
                f"[{lo:g}, {hi:g}]. Clip or rescale it (0..255 images: divide by 255), or pass "
                "check_range=False if this is intended."
            )


def nonfinite_samples(arr: Any) -> list[int]:
    """Indices along axis 0 of the samples holding NaN or Inf (numpy array or CPU tensor)."""
    flat = arr.reshape(arr.shape[0], -1)
    if isinstance(flat, np.ndarray):
        return np.flatnonzero(~np.isfinite(flat).all(axis=1)).tolist()
    return (~flat.isfinite().all(dim=1)).nonzero().flatten().tolist()


def check_pair(x: Any, y: Any, spec: FeatureSpec, *, check_values: bool = True,
               check_range: bool = False, **kw: Any) -> None:
    """Both inputs valid and of the same shape; values are scanned last."""
    check_tensor(x, "x", spec, check_values=False, **kw)
    check_tensor(y, "y", spec, check_values=False, **kw)
    if tuple(x.shape) != tuple(y.shape):
        raise InputError(
            f"x has shape {tuple(x.shape)} but y has {tuple(y.shape)}; accepted: equal shapes. "
            "Resize or crop one to the other (the CLI's --size-policy does this)."
        )
    if check_values:
        for name, t in (("x", x), ("y", y)):
            _check_values(t, _describe(t)[2], name, spec, check_range)
