"""A folder of exported models keyed by what they compute, built once and reused.

Each entry is ``<name>.onnx`` beside ``<name>.json``, a sidecar recording the key,
the model file's SHA-256 and the parity errors measured at export. An entry is
used only if its sidecar parses, names the same key, and the model's hash and
metadata match; otherwise it is rebuilt. Both files are written atomically and a
lock file (``fcntl.flock``) serializes processes that build the same entry.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .. import __version__, kinds
from .._io import atomic_write_bytes, file_lock, sha256_file
from ..errors import ModelError, PerceptualError
from ..export import export_onnx
from ..runtime import read_info
from ..runtime.providers import default_cache_dir
from ..spec import FeatureSpec, LossConfig, json_digest


@dataclass(frozen=True)
class CachedModel:
    path: str
    key: str
    built: bool  # exported by this call (False: reused)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # parity at export
    seconds: float = 0.0  # export time when built


def model_key(spec: FeatureSpec, loss: LossConfig | None, dtype: str = "float32",
              graph: str = "distance", head: Any = None, spatial: bool = False,
              grad: bool = False, static_shape: tuple[int, int, int] | None = None) -> str:
    """Hash of everything the model's numbers depend on.

    A weights file enters by its size, modification time and status-change time
    (ctime, which no one can set back) too, so replacing or rewriting the file
    re-exports instead of reusing numbers from the old one. A learned head's
    weights (``head``: LPIPS' LinearWeights, DISTS' DistsWeights) enter by their SHA-256,
    and LPIPS' ``spatial``; a static-shape export by its shape.
    """
    # Term order is output order: keep it (a dict would be hashed sorted).
    terms = None if loss is None else {"content": list(loss.content.items()),
                                       "style": list(loss.style.items()), "gram": loss.gram}
    material: dict[str, Any] = {"spec": spec.key(), "loss": terms, "dtype": dtype,
                                "graph": graph, "version": __version__}
    kind = kinds.get(graph)
    if kind.head is not None:  # the head's weights by their hash (and its spatial map)
        material[kind.head] = {"weights_sha256": head.sha256 if head is not None else None,
                               **({"spatial": bool(spatial)} if kind.spatial else {})}
    if grad:  # only when set, so the keys of models without a gradient stay as they were
        material["grad"] = True
    if static_shape is not None:  # the same: only when set
        material["static_shape"] = [int(v) for v in static_shape]
    if spec.weights not in ("imagenet", "random") and os.path.isfile(spec.weights):
        st = os.stat(spec.weights)
        # ctime: a rewrite in place with the same size and its mtime set back changes it.
        material["weights_file"] = [os.path.abspath(spec.weights), st.st_size, st.st_mtime_ns,
                                    st.st_ctime_ns]
    return json_digest(material)


def models_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "models")


def _sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def check_entry(path: str, key: str, spec: FeatureSpec, loss: LossConfig | None,
                dtype: str, graph: str = "distance", head: Any = None,
                spatial: bool = False, grad: bool = False,
                static_shape: tuple[int, int, int] | None = None) -> tuple[dict[str, Any] | None, str]:
    """(sidecar record, "") if the entry at ``path`` is intact, else (None, why not)."""
    if not os.path.isfile(path):
        return None, "not built yet"
    try:
        with open(_sidecar(path), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, f"sidecar unreadable ({type(exc).__name__})"
    if not isinstance(record, dict) or record.get("key") != key:
        return None, "sidecar is for another model"
    if sha256_file(path) != record.get("sha256"):
        return None, "model file does not match the SHA-256 in its sidecar (corrupt or edited)"
    try:
        info = read_info(path)
    except PerceptualError as exc:
        return None, f"model unreadable ({exc})"
    # The exporter cuts the spec to the layers the loss weighs: compare with that.
    built_spec = loss.used_spec(spec) if loss is not None else spec
    if (info.graph, info.dtype, info.spec, info.loss, info.grad) != (graph, dtype, built_spec, loss, grad):
        return None, "model metadata differs from the requested spec"
    if info.static_shape != (tuple(static_shape) if static_shape is not None else None):
        return None, "model's static shape differs from the requested one"
    kind = kinds.get(graph)
    if kind.head is not None:
        recorded = (getattr(info, kind.head) or {}).get("weights_sha256")
        if recorded != getattr(head, "sha256", None) or (kind.spatial and info.spatial != bool(spatial)):
            spatial_too = " or spatial output" if kind.spatial else ""
            return None, f"model's {kind.label} weights{spatial_too} differ from the requested ones"
    return record, ""


def ensure_model(spec: FeatureSpec, loss: LossConfig | None, *, dtype: str = "float32",
                 graph: str = "distance", folder: str | None = None, name: str | None = None,
                 rebuild: bool = False, weights: Any = None, grad: bool = False,
                 say: Callable[[str], None] | None = None, lpips_weights: Any = None,
                 spatial: bool = False, dists_weights: Any = None,
                 static_shape: tuple[int, int, int] | None = None) -> CachedModel:
    """The path of a verified model for (spec, loss, dtype, graph), exporting it if needed.

    folder: where entries live (default: ``<default_cache_dir()>/models``).
    name: file stem (default: the key). rebuild: export even if an entry looks intact
        (used when an intact-looking entry fails to load). weights: already loaded
        weights for ``spec`` (default: loaded by the export). grad: a model that also
        outputs ``grad.x`` (export_onnx's ``grad``); part of the key.
    lpips_weights, spatial: graph "lpips" only (see export_onnx); the linear weights
        are loaded here (default: the lpips package's file) and keyed by their hash.
    dists_weights: graph "dists" only: alpha/beta (default: the DISTS_pytorch wheel's),
        loaded here and keyed by their hash.
    static_shape: (batch, height, width) for a static-shape export (export_onnx's); part
        of the key, so each shape has its own entry.
    """
    say = say or (lambda msg: None)
    kind = kinds.get(graph)
    given = {"lpips_weights": lpips_weights, "dists_weights": dists_weights}
    head = kind.module()
    head_weights = head.resolve_weights(given[kind.weights_option], spec) if head is not None else None
    key = model_key(spec, loss, dtype, graph, head_weights, spatial, grad, static_shape)
    folder = folder or models_dir()
    path = os.path.join(folder, f"{name or key}.onnx")
    os.makedirs(folder, exist_ok=True)
    with file_lock(os.path.join(folder, f"{name or key}.lock")):
        # Checked under the lock: another process may have just built it.
        record, why = check_entry(path, key, spec, loss, dtype, graph, head_weights, spatial, grad,
                                  static_shape)
        if record is not None and not rebuild:
            return CachedModel(path, key, built=False, errors=record.get("errors", {}))
        if rebuild:
            why = "it failed to load"
        say(f"exporting the {graph} model to {path} ({why}); this is done once")
        # The old sidecar stays until the new one replaces it: it cannot vouch for the new
        # file (its SHA-256 differs), and an export that fails leaves the old entry intact.
        extra = {} if head is None else {kind.weights_option: head_weights}
        extra.update({"spatial": spatial} if kind.spatial else {})
        result = export_onnx(spec, path, graph=graph, loss=loss, dtype=dtype, weights=weights,
                             progress=say, **extra, **({"grad": True} if grad else {}),
                             **({"static_shape": tuple(static_shape)} if static_shape is not None else {}))
        errors = {k: {"max_abs": e.max_abs, "max_rel": e.max_rel} for k, e in result.errors.items()}
        record = {"key": key, "sha256": sha256_file(path), "spec": spec.to_dict(),
                  "loss": loss.to_dict() if loss else None, "graph": graph, "grad": grad, "dtype": dtype, "version": __version__,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": errors,
                  "weights_sha256": result.weights_sha256}
        atomic_write_bytes(_sidecar(path), json.dumps(record, indent=2).encode())
        return CachedModel(path, key, built=True, errors=errors, seconds=result.seconds)


def open_engine(spec: FeatureSpec, loss: LossConfig | None, *, device: str = "auto",
                precision: str = "auto",
                dtype: str = "float32", folder: str | None = None,
                say: Callable[[str], None] | None = None, graph: str = "distance",
                lpips_weights: Any = None, spatial: bool = False, dists_weights: Any = None):
    """(Engine, CachedModel): the cached model loaded on ``device``; an entry that
    fails to load (ModelError) is rebuilt once, then any failure is the caller's.
    graph "distance" (``loss``), "lpips" (``lpips_weights``, ``spatial``) or "dists"
    (``dists_weights``)."""
    from ..runtime import Engine

    def make(path: str):
        return Engine(path, device, precision=precision)

    kw = dict(dtype=dtype, folder=folder, say=say, graph=graph, lpips_weights=lpips_weights,
              spatial=spatial, dists_weights=dists_weights)
    entry = ensure_model(spec, loss, **kw)
    try:
        return make(entry.path), entry
    except ModelError as exc:
        if entry.built:
            raise
        (say or (lambda m: None))(f"cached model failed to load ({exc}); rebuilding it")
        entry = ensure_model(spec, loss, rebuild=True, **kw)
        return make(entry.path), entry
