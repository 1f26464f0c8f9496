"""Backends: what runs an exported file. Each one only runs feeds and returns outputs;
everything else (validation, memory budget, targets, NaN handling, metadata) is the Engine's.

- ``onnxruntime``: devices "cpu" (exact fp32), "cuda", "tensorrt" and "auto".
- ``openvino``: device "openvino" (the ``[openvino]`` extra), precision f32 or bf16.

A backend has ``providers`` (what really runs), ``on_gpu``, ``run(feeds, names)`` for
host arrays, ``run_cached(feeds, cached, names)`` with device-resident values from
``keep(array)`` (cached targets), and ``describe()`` for ``info``.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np


class Backend(Protocol):
    providers: list[str]

    @property
    def on_gpu(self) -> bool: ...

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]: ...

    def run_cached(self, feeds: Mapping[str, np.ndarray], cached: Mapping[str, Any],
                   names: Sequence[str]) -> dict[str, np.ndarray]: ...

    def keep(self, array: np.ndarray) -> Any: ...
