"""LPIPS in distance matrices: each term of an lpips model is a squared L2 distance between
per-image embeddings, sqrt(w_l,c) · f_c / (‖f‖_c + 1e-10) / sqrt(h·w) at tap l, with the
linear weights w_l read from the model file's own head (runtime/matrix.py runs them)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np

from .. import layers as _layers
from ..errors import ModelError
from .core import EPS


def embed(f: np.ndarray, lin: np.ndarray) -> np.ndarray:
    """The embedding (n, C, h, w) of one tap's features f (n, C, h, w) float32."""
    n, c, h, w = f.shape
    norm = np.sqrt(np.einsum("nchw,nchw->nhw", f, f))[:, None] + np.float32(EPS)
    scale = (np.sqrt(lin) / np.float32(np.sqrt(h * w))).reshape(1, c, 1, 1)
    return (f / norm) * scale.astype(np.float32)


def matrix_terms(info: Any, model: Any, path: str) -> tuple[dict[str, tuple[str, str]], dict[str, float],
                                                          dict[str, np.ndarray],
                                                          Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """(terms {``lpips.<l>``: ("head", l)}, their weights (all 1), the linear weights per
    tap, ``embed``) of an lpips model ``info`` whose ONNX graph is ``model``."""
    layers = tuple(info.spec.layers)
    terms = {f"lpips.{n}": ("head", n) for n in layers}
    recorded = (info.lpips or {}).get("weights_sha256")
    lin = linear_weights(model, recorded, path, info.spec.arch, layers)
    return terms, {t: 1.0 for t in terms}, dict(zip(layers, lin)), embed


def linear_weights(model: Any, recorded: str, path: str, arch: str,
                  taps: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The (C,) linear weights of the file's LPIPS head, one per tap of ``arch`` (the
    model's spec), checked against ``recorded`` (the SHA-256 of lpips.check_linear_weights,
    kept in the metadata).

    Each tap's weights are the first (1, C, 1, 1) initializer, in graph order, of a
    ``Mul`` (the gradient graph's head) or of the 1x1 ``Conv`` that sums Σ_c w_c d_c²
    (the forward graph's). A float16 model holds them rounded to float16, so their
    float32 digest cannot be recomputed: there the integrity digest of the whole graph,
    already checked on these bytes, is what binds them to the export.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    channels = [_layers.resolve(arch, n).channels for n in taps]
    seen: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("Mul", "Conv") or len(seen) == len(channels):
            continue
        names = node.input[1:2] if node.op_type == "Conv" else node.input
        for name in names:
            init = inits.get(name)
            if init is not None and len(init.dims) == 4 and name not in seen \
                    and [init.dims[i] for i in (0, 2, 3)] == [1, 1, 1] \
                    and init.dims[1] == channels[len(seen)]:
                seen.append(name)
                break
    weights = [numpy_helper.to_array(inits[n]).astype(np.float32).reshape(-1) for n in seen]
    half = any(inits[n].data_type == TensorProto.FLOAT16 for n in seen)
    h = hashlib.sha256()
    if [w.size for w in weights] == channels:
        for i, w in enumerate(weights):
            h.update(f"lin{i}.model.1.weight".encode())
            h.update(np.ascontiguousarray(w).tobytes())
    if [w.size for w in weights] != channels or (not half and h.hexdigest() != recorded):
        raise ModelError(f"{path!r}: its LPIPS linear weights could not be found or do not match the "
                         "SHA-256 in its metadata; distance matrices need a graph exported by this "
                         "package (perceptual-engine export --graph lpips). Re-export it.")
    return tuple(weights)
