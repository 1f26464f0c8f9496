"""Image files -> float32 RGB arrays in [0, 1], with Pillow, by documented rules.

Conversion rules (the same for ``load_image``, ``load_images`` and the CLI):

- The pixel count is read from the header and checked against ``max_pixels``
  *before* decoding, so a decompression bomb is refused without allocating it.
- EXIF orientation is applied (``ImageOps.exif_transpose``): a portrait photo
  stored sideways with an orientation tag comes out upright, H and W swapped.
- Only the first frame of a multi-frame file (GIF, TIFF) is read.
- 8-bit grayscale (``L``, and 1-bit ``1``) is replicated to three channels; 16-bit
  grayscale (``I;16*``, and ``I`` holding 0..65535) is divided by 65535, not 255.
- Float grayscale (``F``) is taken as already in [0, 1]; other values are refused.
- Transparency (``RGBA``, ``LA``, ``PA`` and palette ``P`` images, converted via
  RGBA) is composited over a **white** background: out = a·rgb + (1 − a)·1.
- CMYK (and YCbCr, LAB, HSV) is converted to RGB by Pillow.
- Anything that cannot be read (missing file, folder, not an image, truncated or
  corrupt data, bomb) raises ImageError naming the file and the reason.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable

import numpy as np

from .errors import ConfigError, ImageError

MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels, e.g. 8192 x 8192; below Pillow's own bomb limit
SIZE_POLICIES = ("error", "resize", "center-crop")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read one image file as a float32 array of shape (1, 3, H, W), values in [0, 1].

    H and W are those after EXIF orientation. See the module docstring for how
    grayscale, 16-bit, palette, transparent and CMYK images are converted.
    Raises ImageError if the file cannot be read or exceeds ``max_pixels``.
    """
    return decode(path, max_pixels=max_pixels)[None]


def load_images(paths: Iterable[str | os.PathLike], *,
                max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read images of one size as a float32 batch (N, 3, H, W) in [0, 1].

    Raises ImageError if any cannot be read, or if their sizes differ (naming them).
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ImageError("load_images got no paths; give at least one image file.")
    arrays = [decode(p, max_pixels=max_pixels) for p in paths]
    sizes = {a.shape[1:] for a in arrays}
    if len(sizes) > 1:
        listed = ", ".join(f"{p} is {a.shape[1]}x{a.shape[2]}" for p, a in zip(paths, arrays))
        raise ImageError(
            f"images differ in size ({listed}; height x width); accepted: one size for a "
            "batch. Resize or crop them to one size, or load them one by one with load_image."
        )
    return np.ascontiguousarray(np.stack(arrays))


def decode(path: str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read one image as (3, H, W) float32 in [0, 1] (``load_image`` without the batch axis)."""
    path = os.fspath(path)
    check_file(path)
    return _decode(path, path, max_pixels, None)


def decode_bytes(data: bytes, name: str, *, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 formats: tuple[str, ...] | None = None) -> np.ndarray:
    """``decode`` of an image file's bytes (an upload): the same rules, the same array.

    name: how messages call the data (e.g. the uploaded file's name). formats: the
    Pillow format names accepted (e.g. ``("PNG", "JPEG")``), None for every format
    Pillow reads; the others are refused by name, without running their decoders.
    Raises ImageError as ``decode`` does.
    """
    import io

    if not data:
        raise ImageError(f"{name!r} is empty (0 bytes); send the image file's bytes.")
    return _decode(io.BytesIO(data), name, max_pixels, formats, head=bytes(data[:12]))


def _decode(source, name: str, max_pixels: int | None, formats: tuple[str, ...] | None,
            head: bytes | None = None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(source, formats=list(formats) if formats is not None else None) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise over_budget(name, w, h, max_pixels)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_array(img, name)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
            Image.DecompressionBombError) as exc:  # Pillow's plugins report broken data with any of these
        raise read_error(name, exc, head=head, formats=formats) from exc


def check_file(path: str) -> None:
    """ImageError if ``path`` is a folder, missing or empty (before Pillow is asked)."""
    if os.path.isdir(path):
        raise ImageError(f"{path!r} is a folder; give the path of an image file.")
    if not os.path.exists(path):
        raise ImageError(f"{path!r} does not exist; give the path of an image file.")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path!r} is empty (0 bytes); re-export or re-download it.")


def over_budget(path: str, w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"{path!r} is {w}x{h} = {w * h} pixels, over the budget of {max_pixels} "
        "(refused before decoding: it could be a decompression bomb). Downscale it, "
        "or raise the budget (max_pixels= / --max-pixels).")


def read_error(path: str, exc: BaseException, *, head: bytes | None = None,
               formats: tuple[str, ...] | None = None) -> ImageError:
    """The one wording of a file Pillow could not read, for every command (``distance``'s
    rows, ``matrix``'s unreadable files) and the server's uploads (``head``: the data's
    first bytes; ``formats``: the formats it accepts)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        kind = _signature(path) if head is None else _signature_of(head)
        if formats is not None and kind and kind.upper() not in formats:
            return ImageError(f"{path!r} is a {kind} file; accepted formats: {', '.join(formats)}. "
                              "Convert it, e.g. to PNG.")
        if formats is not None and not kind:
            return ImageError(f"{path!r} is not an image in an accepted format; accepted: "
                              f"{', '.join(formats)}.")
        if kind:  # the header says image, the data does not parse: damaged, not foreign
            return ImageError(f"{path!r} starts like a {kind} file but is corrupt (Pillow cannot "
                              "parse it: a bad checksum or a damaged header); re-export or "
                              "re-download it.")
        return ImageError(f"{path!r} is not an image Pillow can identify; accepted: PNG, JPEG, "
                          "TIFF, BMP, GIF, WebP and the other formats Pillow reads.")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"{path!r} was refused as a decompression bomb ({exc}).")
    if isinstance(exc, MemoryError):
        return ImageError(f"{path!r} does not fit in memory; downscale it.")
    if isinstance(exc, PermissionError):
        return ImageError(f"{path!r} cannot be opened (permission denied); make it readable.")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ImageError(f"{path!r} is truncated or corrupt ({reason}); re-export or re-download it.")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
)


def _signature(path: str) -> str:
    """The image format a file's first bytes announce, or "" (WebP: RIFF....WEBP)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return ""
    return _signature_of(head)


def _signature_of(head: bytes) -> str:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), "")


def _to_array(img, path: str) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    elif mode in ("P", "PA"):
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode in _TO_RGB:
        img, mode = img.convert("RGB"), "RGB"
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode == "RGB":
        rgb = np.asarray(img, dtype=np.float32) / 255.0
    elif mode == "L":
        rgb = _gray(np.asarray(img, dtype=np.float32) / 255.0)
    elif mode in ("RGBA", "LA"):
        a = np.asarray(img, dtype=np.float32) / 255.0
        color, alpha = a[..., :-1], a[..., -1:]
        rgb = color * alpha + (1.0 - alpha)  # over white
        if mode == "LA":
            rgb = _gray(rgb[..., 0])
    elif mode in _GRAY16 or mode == "I":
        raw = np.asarray(img)
        if raw.size and (int(raw.min()) < 0 or int(raw.max()) > 65535):
            raise ImageError(f"{path!r} is a 32-bit integer image with values in "
                             f"[{int(raw.min())}, {int(raw.max())}]; accepted: 16-bit "
                             "(0..65535). Convert it to 8- or 16-bit first.")
        rgb = _gray(raw.astype(np.float32) / 65535.0)
    elif mode == "F":
        raw = np.asarray(img, dtype=np.float32)
        if raw.size and not (np.isfinite(raw).all() and raw.min() >= -1e-3 and raw.max() <= 1 + 1e-3):
            raise ImageError(f"{path!r} is a float image with values outside [0, 1] (or NaN); "
                             "accepted: [0, 1]. Rescale it before saving.")
        rgb = _gray(np.clip(raw, 0.0, 1.0))
    else:
        try:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except (ValueError, OSError) as exc:
            raise ImageError(f"{path!r} has image mode {mode!r}, which cannot be converted to "
                             "RGB; save it as 8-bit RGB.") from exc
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def _gray(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def is_image_name(name: str) -> bool:
    """Does a file name have an image extension (case-insensitive)?"""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 -> (3, h, w), bicubic (antialiased when shrinking), clipped to [0, 1]."""
    from PIL import Image

    h, w = size
    if x.shape[1:] == (h, w):
        return x
    planes = [np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BICUBIC))
              for c in x]
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)


def limit_side(x: np.ndarray, max_side: int | None) -> np.ndarray:
    """(3, H, W) -> downscaled (bicubic, antialiased) so that max(H, W) <= max_side,
    keeping the aspect ratio (the shorter side rounded, at least 1); unchanged if it fits."""
    h, w = x.shape[1:]
    if max_side is None or max(h, w) <= max_side:
        return x
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(x, (min(size[0], max_side), min(size[1], max_side)))


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) -> the centered (3, h, w) window (h <= H, w <= W)."""
    h, w = size
    top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
    return np.ascontiguousarray(x[:, top:top + h, left:left + w])


def match_sizes(x: np.ndarray, y: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Apply a size policy to a pair of (3, H, W) arrays.

    "error": differing sizes raise ImageError; "resize": y is resized to x's size;
    "center-crop": both are center-cropped to the smaller height and width.
    """
    if x.shape == y.shape:
        return x, y
    if policy == "resize":
        return x, resize(y, x.shape[1:])
    if policy == "center-crop":
        size = (min(x.shape[1], y.shape[1]), min(x.shape[2], y.shape[2]))
        return center_crop(x, size), center_crop(y, size)
    if policy == "error":
        raise ImageError(
            f"sizes differ: {x.shape[1]}x{x.shape[2]} vs {y.shape[1]}x{y.shape[2]} (height x "
            "width); use --size-policy resize or center-crop to compare them anyway."
        )
    raise ConfigError(f"size policy {policy!r} is not accepted; accepted: "
                      f"{', '.join(SIZE_POLICIES)}.")


def save_image(path: str | os.PathLike, x: np.ndarray, *, input_range: str = "0,1") -> None:
    """Write a (3, H, W) float image in ``input_range`` as an 8-bit RGB file, atomically.

    Values are clipped to the range and rounded to the nearest 8-bit level; the
    format follows the extension (PNG, JPEG, ... as Pillow writes them). A reader
    sees the old file or the new one, never half of one.
    """
    from PIL import Image

    from ._io import atomic_path
    from .spec import INPUT_RANGES

    lo, hi = INPUT_RANGES[input_range]
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ImageError(f"save_image got an array of shape {arr.shape}; accepted: (3, H, W).")
    unit = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    img = Image.fromarray(np.round(unit.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
    fmt = writable_format(path)
    if fmt is None:
        raise ImageError(f"{os.fspath(path)!r} has no image extension Pillow writes; accepted: "
                         f"{WRITABLE_EXAMPLES}, ... Name the file e.g. out.png.")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


WRITABLE_EXAMPLES = ".png, .jpg, .bmp, .tif, .webp"


def writable_format(path: str | os.PathLike) -> str | None:
    """The Pillow format ``save_image`` writes for ``path``'s extension, or None when
    Pillow cannot write an 8-bit RGB image in it: formats it only reads (.psd, .gbr,
    .fli, .cur, ...), save handlers it registers but does not install (.h5, .wmf) and
    formats without RGB (.xbm, .msp)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return _rgb_writable().get(ext)


@functools.lru_cache(maxsize=1)
def _rgb_writable() -> dict[str, str]:
    """{extension: format} for every format that encodes a small RGB image: asked of
    Pillow once, by trying, since its tables list handlers that then refuse."""
    import io
    import warnings

    from PIL import Image

    probe = Image.new("RGB", (3, 2), (12, 200, 40))
    out = {}
    for ext, fmt in Image.registered_extensions().items():
        if fmt not in Image.SAVE:
            continue
        try:
            with warnings.catch_warnings():  # deprecation notices of old formats (IM)
                warnings.simplefilter("ignore")
                probe.save(io.BytesIO(), format=fmt)
        except Exception:  # noqa: BLE001 - any refusal means: not writable as RGB
            continue
        out[ext] = fmt
    return out
