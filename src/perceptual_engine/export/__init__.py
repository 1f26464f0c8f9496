"""torch -> ONNX export: graph builders, metadata, verification, Triton repositories.

Names are imported on first use, so reading a model's metadata (the runtime does)
does not import torch.
"""
from __future__ import annotations

from .. import _lazy_exports

_EXPORTS = {
    "export_onnx": ".exporter", "ExportResult": ".exporter", "DTYPES": ".metadata",
    "GRAPH_KINDS": ".metadata", "FORMAT_VERSION": ".metadata", "ModelInfo": ".metadata",
    "OutputParity": ".verify",
    "OutputError": ".verify",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
