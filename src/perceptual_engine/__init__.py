"""perceptual-engine: fast VGG perceptual losses on ONNX Runtime, with a PyTorch reference.

Public API (names are part of the contract)::

    from perceptual_engine import FeatureSpec, LossConfig, TorchFeatures, \
        TorchPerceptualLoss, export_onnx, Engine, EnginePerceptualLoss, PerceptualError, \
        load_image, load_images, stylize, StylizeResult
"""
__version__ = "0.1.0"

from .errors import PerceptualError
from .export import export_onnx
from .images import load_image, load_images
from .optimize import StylizeResult, stylize
from .reference import TorchFeatures, TorchPerceptualLoss
from .runtime import Engine
from .runtime.loss import EnginePerceptualLoss
from .spec import FeatureSpec, LossConfig

__all__ = [
    "FeatureSpec",
    "LossConfig",
    "TorchFeatures",
    "TorchPerceptualLoss",
    "export_onnx",
    "Engine",
    "EnginePerceptualLoss",
    "PerceptualError",
    "load_image",
    "load_images",
    "stylize",
    "StylizeResult",
    "__version__",
]
