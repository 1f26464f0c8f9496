"""The images an optimization starts from: content and style, from files or arrays, as
float32 (1, 3, H, W) in the input range, resized to the asked sizes."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..spec import INPUT_RANGES


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
    from ..images import resize

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
    from ..errors import InputError
    from ..images import decode

    if isinstance(value, (str, os.PathLike)):
        return decode(value)
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != 3 or not np.isfinite(arr).all():
        raise InputError(f"the {what} image has shape {arr.shape} (or non-finite values); "
                         "accepted: a file path, or a finite float array (3, H, W) or (1, 3, H, W).")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
