"""Host arrays for a backend: numpy in, contiguous numpy out (CPU torch tensors without a copy)."""
from __future__ import annotations

from typing import Any

import numpy as np


def to_host(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v)
    return np.ascontiguousarray(v.detach().cpu().numpy())  # a CPU torch tensor: no copy
