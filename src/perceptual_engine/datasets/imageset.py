"""A set of image files for distance matrices: listed, sized, decoded batch by batch.

All images of a matrix share one size (LPIPS and content terms compare positions).
With ``--size-policy error`` mixed sizes are refused, the sizes named; ``resize``
resizes every image to the first readable one's size (bicubic); ``center-crop`` crops
every image to the smallest height and width of the set. Sizes are read from the
file headers (EXIF orientation applied), so nothing is decoded twice. A file that
cannot be read keeps its place: its row (and column) is marked with the reason.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ..errors import ImageError, InputError
from ..images import MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, center_crop, decode, resize
from ..spec import INPUT_RANGES
from .pairs import walk_images


class ImageSet:
    """Images from a folder (recursively, sorted by relative path) or one file.

    ``names``: the relative paths (the file name for a single file); ``paths``: on disk.
    ``errors``: {index: why} for files that could not be read (header or decode).
    """

    def __init__(self, root: str, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.root, self.max_pixels = root, max_pixels
        if os.path.isdir(root):
            self.names = list(walk_images(root))
            self.paths = [os.path.join(root, *n.split("/")) for n in self.names]
            if not self.names:
                raise InputError(f"no image files under {root!r}; accepted extensions: "
                                 f"{' '.join(IMAGE_EXTENSIONS)}.")
        elif os.path.exists(root):
            self.names, self.paths = [os.path.basename(root)], [root]
        else:
            raise InputError(f"{root!r} does not exist; give an image folder (or one image file).")
        self.errors: dict[int, str] = {}
        self.sizes: list[tuple[int, int] | None] = [self._size(i) for i in range(len(self.paths))]

    def __len__(self) -> int:
        return len(self.paths)

    def _size(self, i: int) -> tuple[int, int] | None:
        from PIL import Image

        from ..images import check_file, over_budget, read_error

        path = self.paths[i]
        try:  # worded as distance words the same file (images.read_error)
            check_file(path)
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees
                    h, w = w, h
        except Exception as exc:
            self.errors[i] = str(read_error(path, exc))
            return None
        if self.max_pixels and h * w > self.max_pixels:
            self.errors[i] = str(over_budget(path, w, h, self.max_pixels))
            return None
        return (h, w)

    def readable(self) -> list[int]:
        return [i for i, s in enumerate(self.sizes) if s is not None]


def common_size(sets: list[ImageSet], policy: str, min_size: int) -> tuple[int, int]:
    """The one size every image is brought to under ``policy`` (see the module docstring)."""
    sizes = [(s, n) for st in sets for s, n in zip(st.sizes, st.names) if s is not None]
    if not sizes:
        listed = "; ".join(next(iter(st.errors.values())) for st in sets if st.errors)
        raise InputError(f"none of the images could be read ({listed}).")
    distinct = sorted({s for s, _ in sizes})
    if policy == "resize":
        size = sizes[0][0]
    elif policy == "center-crop":
        size = (min(s[0] for s, _ in sizes), min(s[1] for s, _ in sizes))
    elif len(distinct) > 1:
        groups = []
        for d in distinct[:4]:
            names = [n for s, n in sizes if s == d]
            groups.append(f"{len(names)} of {d[0]}x{d[1]} ({', '.join(names[:2])}"
                          f"{', ...' if len(names) > 2 else ''})")
        raise InputError(f"the images differ in size: {'; '.join(groups)}"
                         f"{'; ...' if len(distinct) > 4 else ''} (height x width). A distance "
                         "matrix compares positions, so every image needs one size: use "
                         "--size-policy resize (to the first image's size) or center-crop.")
    else:
        size = distinct[0]
    if min(size) < min_size:
        raise InputError(f"the images are {size[0]}x{size[1]}, too small for the model's deepest "
                         f"layer; accepted: height and width >= {min_size}.")
    return size


class Loader:
    """Decodes images of one set to (3, H, W) float32 in the model's input range."""

    def __init__(self, size: tuple[int, int], policy: str, input_range: str,
                 max_pixels: int | None, workers: int | None = None) -> None:
        self.size, self.max_pixels = size, max_pixels
        self.crop = policy == "center-crop"  # else resize (a set of one size is left as is)
        self.input_range = input_range
        self.lo, self.hi = INPUT_RANGES[input_range]
        self.workers = workers or min(4, os.cpu_count() or 1)

    def one(self, path: str) -> np.ndarray:
        x = decode(path, max_pixels=self.max_pixels)
        if x.shape[1:] != self.size:
            h, w = x.shape[1:]
            if self.crop and h >= self.size[0] and w >= self.size[1]:
                x = center_crop(x, self.size)
            else:
                x = resize(x, self.size)
        if (self.lo, self.hi) != (0.0, 1.0):
            x = self.lo + (self.hi - self.lo) * x
        return np.ascontiguousarray(x, dtype=np.float32)

    def batches(self, st: ImageSet, batch: int) -> Iterator[tuple[list[int], np.ndarray | None, dict[int, str]]]:
        """(indices, (k, 3, H, W) array, {index: error}) per batch of ``batch`` images."""
        def load(i: int):
            if i in st.errors:
                return i, None, st.errors[i]
            try:
                return i, self.one(st.paths[i]), ""
            except ImageError as exc:
                return i, None, str(exc)

        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(st), batch):
                got = list(pool.map(load, range(start, min(start + batch, len(st)))))
                ok = [(i, x) for i, x, e in got if x is not None]
                bad = {i: e for i, x, e in got if x is None}
                arr = np.stack([x for _, x in ok]) if ok else None
                yield [i for i, _ in ok], arr, bad


def fill_store(embed: Callable[[np.ndarray], dict], st: ImageSet, store, loader: Loader, batch: int,
               progress: Callable[[int], None] | None = None) -> None:
    """Embed every readable image of ``st`` into ``store``; mark the others failed."""
    for idx, arr, bad in loader.batches(st, batch):
        if arr is not None:
            store.put(np.asarray(idx), embed(arr))
        for i, why in bad.items():
            store.fail(i, why)
        if progress is not None:
            progress(len(idx) + len(bad))
