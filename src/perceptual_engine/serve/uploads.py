"""Uploaded image files -> the engine's arrays, by load_image's rules (images.decode_bytes),
with the server's bounds; RequestError carries the HTTP status of a client's mistake."""
from __future__ import annotations

import numpy as np

from ..errors import ImageError, InputError
from ..images import decode_bytes
from ..spec import INPUT_RANGES
from .config import Limits


class RequestError(InputError):
    """A request the server refuses; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def header_pixels(data: bytes) -> int:
    """Width x height from an image file's header (nothing decoded); 0 where Pillow cannot
    read it (decoding then says why)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            return int(w) * int(h)
    except Exception:
        return 0


def decode_upload(data: bytes, name: str, limits: Limits) -> np.ndarray:
    """(3, H, W) float32 in [0, 1], exactly ``load_image(file)[0]``; RequestError (400) otherwise."""
    try:
        return decode_bytes(data, name, max_pixels=limits.max_pixels, formats=limits.formats)
    except ImageError as exc:
        raise RequestError(str(exc), 400) from None


def to_range(x: np.ndarray, input_range: str) -> np.ndarray:
    """[0, 1] -> the model's input range (as ``distance`` scales its pairs)."""
    lo, hi = INPUT_RANGES[input_range]
    if (lo, hi) == (0.0, 1.0):
        return x
    return lo + (hi - lo) * x


def decode_pair(a: tuple[bytes, str], b: tuple[bytes, str], limits: Limits,
                input_range: str, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both images of a pair, in the model's range; RequestError (422) when their sizes differ
    (nothing is resized on the server)."""
    x = decode_upload(a[0], a[1], limits)
    y = decode_upload(b[0], b[1], limits)
    if x.shape != y.shape:
        raise RequestError(
            f"sizes differ: a {a[1]!r} is {x.shape[1]}x{x.shape[2]}, b {b[1]!r} is "
            f"{y.shape[1]}x{y.shape[2]} (height x width); accepted: two images of one size. "
            "Resize or crop them to one size first (the server never resizes).", 422)
    if min(x.shape[1:]) < min_size:
        raise RequestError(f"{x.shape[1]}x{x.shape[2]} is too small for the model's deepest layer; "
                           f"accepted: height and width >= {min_size}.", 422)
    return to_range(x, input_range), to_range(y, input_range)
