"""ONNX Runtime: provider selection, session options, Engine, IO binding."""
from .engine import Engine, read_info
from .providers import DEVICES, ProviderOptions, ShapeRange

__all__ = ["Engine", "ProviderOptions", "ShapeRange", "DEVICES", "read_info"]
