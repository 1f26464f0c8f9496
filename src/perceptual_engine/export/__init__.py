"""torch -> ONNX export: graph builders, metadata, verification, Triton repositories.

Names are imported on first use, so reading a model's metadata (the runtime does)
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_onnx": ".exporter", "ExportResult": ".exporter", "DTYPES": ".metadata",
    "GRAPH_KINDS": ".metadata", "FORMAT_VERSION": ".metadata", "ModelInfo": ".metadata",
    "OutputParity": ".verify",
    "OutputError": ".verify",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perceptual_engine.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
