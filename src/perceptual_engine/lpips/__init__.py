"""The LPIPS head (Zhang et al. 2018, the ``lpips`` package v0.1) on three trunks: "vgg"
(VGG16, the default here), "alex" (AlexNet) and "squeeze" (SqueezeNet 1.1).

The parts: nets.py (the three nets: trunk and taps; torch-free), core.py (spec, linear
weights, the formulas and their VJPs), reference.py (``TorchLPIPS``, the PyTorch
reference), graph.py (``LpipsGraph``, ``lpips_and_grad``, ``build`` for export_onnx),
matrix.py (per-image embeddings for distance matrices). Their public names are
re-exported here (``lpips.default_spec``, ``lpips.TorchLPIPS``), imported on first use:
``import perceptual_engine.lpips.nets`` (the command line, the registry) costs no torch.
"""
from __future__ import annotations

from .. import _lazy_exports

# public name -> the part that defines it
_EXPORTS = {
    **{name: ".core" for name in (
        "LAYERS", "ARCH", "EPS", "INSTALL_HINT", "HALF_INV_NORM_CAP", "output_names", "net_of",
        "check_spec", "default_spec", "spec_from_flags", "LinearWeights", "resolve_weights",
        "default_weights_path", "load_linear_weights", "check_linear_weights", "normalize_channels",
        "tap_map", "upsample", "head", "head_pair", "normalize_vjp", "head_vjp")},
    **{name: ".graph" for name in ("lpips_and_grad", "LpipsGraph", "build")},
    **{name: ".nets" for name in ("NETS", "LpipsNet")},
    "TorchLPIPS": ".reference",
    "matrix_terms": ".matrix",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
