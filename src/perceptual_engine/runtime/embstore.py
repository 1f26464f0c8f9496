"""Per-image embeddings for distance matrices: in memory, or spilled to memory-mapped files.

An ``EmbeddingStore`` holds, for n images, one (n, D_t) matrix per term t (the
embedding of runtime/matrix.py), the squared norm of every row (float64, computed
from the stored values so that a row's distance to itself is exactly 0), and which
rows are valid (an image that could not be read has no embedding). Rows are
written once, in any order, then read in blocks by the GEMM.

When the store does not fit the memory budget it lives in ``np.memmap`` files in a
private temporary folder (``spill_dir``, else the system's temporary folder), which
``close()`` (or the garbage collector) removes. The operating system pages blocks
in and out, so only the blocks being multiplied occupy memory.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import weakref
from typing import Mapping

import numpy as np

from ..errors import ConfigError

STORE_DTYPES = ("float32", "float16")


class EmbeddingStore:
    """n rows of per-term embeddings. ``dims``: {term: D_t} in term order.

    dtype: "float32" (default) or "float16" (half the memory and disk; its error on
        distances is measured in docs/matrix.md). Blocks are returned as float32.
    spill: keep the rows in memory-mapped files instead of memory.
    """

    def __init__(self, n: int, dims: Mapping[str, int], *, dtype: str = "float32",
                 spill: bool = False, spill_dir: str | None = None) -> None:
        if dtype not in STORE_DTYPES:
            raise ConfigError(f"embedding dtype {dtype!r} is not accepted; accepted: "
                              f"{', '.join(STORE_DTYPES)}.")
        self.n, self.dims, self.dtype = int(n), dict(dims), dtype
        self.spilled = bool(spill)
        self.folder: str | None = None
        self.valid = np.zeros(self.n, dtype=bool)
        self.errors: dict[int, str] = {}  # row -> why it has no embedding
        self.norms = {t: np.zeros(self.n, dtype=np.float64) for t in self.dims}
        self._data: dict[str, np.ndarray] = {}
        if self.spilled:
            if spill_dir is not None and not os.path.isdir(spill_dir):
                raise ConfigError(f"spill folder {spill_dir!r} does not exist; create it or give "
                                  "another one.")
            folder = None
            try:
                # Not mkdtemp: its name is known to us only once it returns, and a signal
                # that lands just after the mkdir would leave the folder nobody removes.
                while True:
                    folder = os.path.join(spill_dir or tempfile.gettempdir(),
                                          f"pe-embeddings-{secrets.token_hex(6)}")
                    try:
                        os.mkdir(folder, 0o700)
                        break
                    except FileExistsError:  # another's: never ours to remove
                        folder = None
                # Removed when the store is collected, even if close() is never called.
                self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
                self.folder = folder
                for i, (t, d) in enumerate(self.dims.items()):
                    path = os.path.join(folder, f"term{i}.bin")
                    self._data[t] = np.memmap(path, dtype=dtype, mode="w+", shape=(max(self.n, 1), d))
            except BaseException:  # a full disk, Ctrl-C or SIGTERM here: no caller holds us to close
                self._data = {}
                if folder is not None:
                    shutil.rmtree(folder, True)
                raise
        else:
            self._data = {t: np.zeros((self.n, d), dtype=dtype) for t, d in self.dims.items()}

    @staticmethod
    def nbytes_for(n: int, dims: Mapping[str, int], dtype: str = "float32") -> int:
        """Bytes of the rows of n images (the norms are negligible)."""
        return int(n) * sum(dims.values()) * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(self.n, self.dims, self.dtype)

    def put(self, rows: np.ndarray | slice, emb: Mapping[str, np.ndarray]) -> None:
        """Store embeddings {term: (k, D_t)} at ``rows`` and mark them valid."""
        for t in self.dims:
            stored = self._data[t]
            stored[rows] = emb[t]
            # The norm of the stored (possibly float16-rounded) values, in float64.
            block = np.asarray(stored[rows], dtype=np.float64)
            self.norms[t][rows] = np.einsum("ij,ij->i", block, block)
        self.valid[rows] = True

    def fail(self, row: int, why: str) -> None:
        """Row ``row`` has no embedding (its image could not be read): ``why``."""
        self.valid[row] = False
        self.errors[row] = why

    def block(self, term: str, rows: slice) -> np.ndarray:
        """Rows of one term as a float32 array in memory (a view when stored as such)."""
        return np.asarray(self._data[term][rows], dtype=np.float32)

    def close(self) -> None:
        """Drop the rows (and the spill folder)."""
        self._data = {}
        if self.folder is not None:
            self._cleanup()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
