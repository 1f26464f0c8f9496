"""perceptual-engine: fast VGG perceptual losses on ONNX Runtime, with a PyTorch reference.

Public API (names are part of the contract)::

    from perceptual_engine import FeatureSpec, LossConfig, TorchFeatures, \
        TorchPerceptualLoss, export_onnx, Engine, EnginePerceptualLoss, PerceptualError, \
        load_image, load_images, stylize, StylizeResult

Names are imported on first use (PEP 562), so ``import perceptual_engine`` and the
command line's start-up do not pay for torch and ONNX until they are needed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any, Callable

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "FeatureSpec": ".spec",
    "LossConfig": ".spec",
    "TorchFeatures": ".reference",
    "TorchPerceptualLoss": ".reference",
    "export_onnx": ".export",
    "Engine": ".runtime",
    "EnginePerceptualLoss": ".runtime.loss",
    "PerceptualError": ".errors",
    "load_image": ".images",
    "load_images": ".images",
    "stylize": ".optimize",
    "StylizeResult": ".optimize",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from .errors import PerceptualError
    from .export import export_onnx
    from .images import load_image, load_images
    from .optimize import StylizeResult, stylize
    from .reference import TorchFeatures, TorchPerceptualLoss
    from .runtime import Engine
    from .runtime.loss import EnginePerceptualLoss
    from .spec import FeatureSpec, LossConfig


# Modules that moved into a subpackage, old path -> new: ``import perceptual_engine.savepaths``
# keeps working and gives the very module ``perceptual_engine.optimize.savepaths`` is.
_MOVED = {
    "savepaths": "optimize.savepaths",
    "optimize_config": "optimize.config",
    "optimize_guard": "optimize.guard",
    "optimize_images": "optimize.images",
    "optimize_loop": "optimize.loop",
    "memory_estimate": "memory.estimator",
    "memory_oom": "memory.oom",
}


class _MovedFinder:
    """Finds an old module path of ``_MOVED`` and loads it as the module at its new path
    (a meta path finder and its loader; importlib.abc is not imported: it costs 20 ms)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__ or rest not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__  # importlib sets __spec__ to this alias spec next
        return module

    def exec_module(self, module: Any) -> None:
        # Already executed under its new name; give it back its own spec, so that
        # importlib.reload reloads it from its file.
        module.__spec__ = module.__spec__.loader_state


if not any(type(f).__name__ == "_MovedFinder" and type(f).__module__ == __name__ for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())


def _lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package that re-exports ``exports`` ({public name:
    relative module}) on first use (PEP 562): the package root and its facades (export/,
    lpips/, dists/) import nothing heavy until a name is asked for."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
