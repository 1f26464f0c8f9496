"""torch -> ONNX export: graph builders, metadata, verification."""
from .exporter import DTYPES, ExportResult, export_onnx
from .graphs import GRAPH_KINDS
from .metadata import FORMAT_VERSION, ModelInfo
from .verify import OutputError

__all__ = ["export_onnx", "ExportResult", "ModelInfo", "OutputError", "DTYPES", "GRAPH_KINDS",
           "FORMAT_VERSION"]
