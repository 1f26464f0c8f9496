"""Which images to compare: two files, two folders matched by relative path, or a CSV.

Every pair keeps the two paths as they will be printed and written; ``--resume``
matches pairs by ``pair_key``, what the paths point to, not how they were typed. A pair that cannot be formed (a file present in one
folder only) is kept with its ``error`` set, so it is reported, never dropped.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Iterator

from ..errors import ConfigError, ImageError
from ..images import IMAGE_EXTENSIONS, is_image_name


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    error: str = ""  # set when the pair cannot be computed at all (one-sided)

    @property
    def key(self) -> tuple[str, str]:
        """What the pair is (see ``pair_key``): ``--resume`` matches on this."""
        return pair_key(self.a, self.b)


def pair_key(a: str, b: str, cwd: str | None = None) -> tuple[str, str]:
    """What a pair *is*, whatever way its paths were typed: both paths made absolute
    (against ``cwd``) with their folders' symlinks resolved (``odd/A``, ``./odd/A/``,
    the absolute path and a symlinked folder give one key). The file name itself is
    kept, so two links to one image stay two pairs."""
    def canon(p: str) -> str:
        full = os.path.normpath(os.path.join(cwd or os.getcwd(), p))
        head, tail = os.path.split(full)
        return os.path.join(os.path.realpath(head), tail)

    return canon(a), canon(b)


def pairs_from_args(a: str | None, b: str | None, pairs_csv: str | None) -> list[Pair]:
    """The pairs that ``distance A B`` or ``distance --pairs FILE`` names."""
    if pairs_csv is not None:
        return read_pairs_csv(pairs_csv)
    if a is None or b is None:
        raise ConfigError("give two images, two folders, or --pairs FILE.csv.")
    for p in (a, b):
        if not os.path.exists(p):
            raise ImageError(f"{p!r} does not exist; give two image files or two folders.")
    if os.path.isdir(a) and os.path.isdir(b):
        return pair_folders(a, b)
    if os.path.isdir(a) or os.path.isdir(b):
        folder, file = (a, b) if os.path.isdir(a) else (b, a)
        raise ConfigError(f"{folder!r} is a folder but {file!r} is a file; give two image files "
                          "or two folders.")
    return [Pair(a, b)]


def walk_images(root: str) -> Iterator[str]:
    """Relative paths (with '/') of the image files under ``root``, recursively, sorted.

    Symlinked folders are followed once: a folder whose real path was already
    visited (a symlink loop, or two links to one folder) is not entered again.
    Names starting with '.' are skipped, as are files without an image extension.
    """
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in seen)
        rel = os.path.relpath(folder, root)
        for name in sorted(files):
            if name.startswith(".") or not is_image_name(name):
                continue
            path = name if rel == "." else os.path.join(rel, name)
            yield path.replace(os.sep, "/")


def pair_folders(a: str, b: str) -> list[Pair]:
    """Pairs of files with the same relative path under ``a`` and ``b``.

    A file present on one side only becomes a Pair whose ``error`` says so.
    """
    left, right = set(walk_images(a)), set(walk_images(b))
    if not left and not right:
        raise ImageError(f"no image files under {a!r} or {b!r}; accepted extensions: "
                         f"{' '.join(IMAGE_EXTENSIONS)}.")
    out = []
    for rel in sorted(left | right):
        pa, pb = _join(a, rel), _join(b, rel)
        if rel not in right:
            out.append(Pair(pa, pb, error=f"only in {a}: no {rel} in {b}"))
        elif rel not in left:
            out.append(Pair(pa, pb, error=f"only in {b}: no {rel} in {a}"))
        else:
            out.append(Pair(pa, pb))
    return out


def _join(root: str, rel: str) -> str:
    return os.path.join(root, *rel.split("/"))


def read_pairs_csv(path: str) -> list[Pair]:
    """Two columns per row: image A, image B.

    Relative paths are taken relative to the CSV file's folder. Blank rows and
    rows starting with '#' are skipped; a first row whose two cells have no file
    extension (e.g. ``a,b`` or ``reference,distorted``) is taken as a header.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"pairs file {path!r} is {'a folder' if os.path.isdir(path) else 'missing'}; "
                          "give a CSV file with two columns (image A, image B).")
    folder = os.path.dirname(path)
    out: list[Pair] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) != 2 or not all(cells):
                raise ConfigError(f"{path}:{line} has {len(cells)} cell(s) {row!r}; accepted: two "
                                  "columns, image A and image B.")
            if not out and line == 1 and not any(os.path.splitext(c)[1] for c in cells):
                continue  # header
            out.append(Pair(*(os.path.join(folder, c) for c in cells)))
    if not out:
        raise ConfigError(f"pairs file {path!r} holds no pairs; write one 'imageA,imageB' per line.")
    return out

