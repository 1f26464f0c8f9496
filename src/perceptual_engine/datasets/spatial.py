"""``distance --spatial-dir``: each pair's LPIPS map as a greyscale PNG, for people to look at.

Mapping: pixel = round(255 · v / max(v)) with v the map (N, 1, H, W -> H, W) of the
pair, so white is that pair's largest per-pixel distance and black zero (LPIPS
maps are >= 0). Maps are scaled one by one: compare grey levels within a map, and
the pairs' ``total`` column across maps. A map that is zero everywhere is black.
The file is named after both images plus a short hash of the pair, so pairs with
the same file names in different folders do not collide; it is written atomically.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from .._io import atomic_write_bytes
from .pairs import Pair


def map_to_uint8(v: np.ndarray) -> np.ndarray:
    """(H, W) float map >= 0 -> (H, W) uint8, scaled by its own maximum."""
    v = np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(v.max()) if v.size else 0.0
    scaled = v / peak if peak > 0 else np.zeros_like(v)
    return np.round(255.0 * np.clip(scaled, 0.0, 1.0)).astype(np.uint8)


def map_name(pair: Pair) -> str:
    """``<stem of a>__<stem of b>-<8 hex of the pair>.png``."""
    stem = lambda p: os.path.splitext(os.path.basename(p))[0] or "image"  # noqa: E731
    digest = hashlib.sha1(f"{pair.a}\0{pair.b}".encode()).hexdigest()[:8]
    return f"{stem(pair.a)}__{stem(pair.b)}-{digest}.png"


class MapWriter:
    """Writes maps into ``folder`` (created if needed); ``write`` is the runner's callback."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.count = 0

    def write(self, pair: Pair, spatial: np.ndarray) -> str:
        return self.write_png(pair, map_png(spatial))

    def write_png(self, pair: Pair, data: bytes) -> str:
        """Write a map already encoded by ``map_png`` (on a Ray actor, say)."""
        path = os.path.join(self.folder, map_name(pair))
        atomic_write_bytes(path, data)
        self.count += 1
        return path


def map_png(spatial: np.ndarray) -> bytes:
    """The PNG bytes of one (H, W) map, scaled by its own maximum."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(map_to_uint8(spatial), mode="L").save(buf, format="PNG")
    return buf.getvalue()
