"""The Engine and its backends (ONNX Runtime: providers, IO binding; OpenVINO)."""
from .engine import DEVICES, Engine, read_info
from .providers import ProviderOptions, ShapeRange

__all__ = ["Engine", "ProviderOptions", "ShapeRange", "DEVICES", "read_info"]
