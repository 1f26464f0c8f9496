"""DISTS (Ding, Ma, Wang, Simoncelli 2020; the authors' ``DISTS_pytorch`` 0.1) on VGG16 with
L2 pooling: spec, alpha/beta, the head and its VJPs, the exported graph and ``TorchDISTS``,
in core.py. Its public names are re-exported here (``dists.default_spec``,
``dists.TorchDISTS``), imported on first use.
"""
from __future__ import annotations

from .. import _lazy_exports

# public name -> the part that defines it
_EXPORTS = {name: ".core" for name in (
    "output_names", "default_spec", "spec_from_flags", "check_spec", "DistsWeights",
    "default_weights_path", "load_weights", "check_weights", "check_derived",
    "resolve_weights", "stages", "head", "head_vjp", "dists_and_grad", "scaled_convs",
    "joined_stages", "stage_areas", "joined_head", "DistsGraph", "TorchDISTS", "build",
    "GRAPH", "ARCH", "POOLING", "LAYERS", "STAGES", "CHANNELS", "C1", "C2", "INSTALL_HINT",
)}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
