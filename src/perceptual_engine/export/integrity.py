"""What a model's metadata claims is bound to what its graph computes.

At export, ``seal`` records two SHA-256 digests in ``metadata_props``:

- ``graph_sha256``, over the graph's content: every initializer (name, data
  type, dims and its values as little-endian bytes, in name order), then the
  nodes, the graph's inputs and outputs, sparse initializers, local functions and
  opset imports, each serialized deterministically. Weights and computation.
- ``integrity``, over the canonical JSON of every ``perceptual_engine.*`` key
  except itself, ``graph_sha256`` included: the claims (spec, loss, input range,
  weights source and hash, dtype) bound to that graph.

``read_model`` parses a file, validates its metadata (metadata.py) and recomputes
both. The metadata digest costs microseconds and is checked on every load; the
graph digest hashes every weight byte, so it is computed once per file identity
(real path, device, inode, size, mtime, ctime) in this process. A mismatch is a
ModelError: the file was edited or damaged after export.

This detects edits and corruption, not forgery: anyone can recompute both digests
after an edit. Authenticity needs a signature, which this format does not carry.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from typing import Any, Mapping

from ..errors import ModelError
from .metadata import PREFIX, ModelInfo

_VERIFIED: dict[tuple[Any, ...], str] = {}  # file identity -> graph_sha256 found in it
_LOCK = threading.Lock()
_MAX_CACHED = 1024


def graph_digest(model: Any) -> str:
    """SHA-256 (hex) of ``model``'s graph content (see the module docstring)."""
    from onnx import TensorProto, numpy_helper

    h = hashlib.sha256(b"perceptual-engine graph v1\0")

    def add(tag: bytes, data: bytes) -> None:  # length-prefixed: no two inputs collide
        h.update(tag + len(data).to_bytes(8, "little"))
        h.update(data)

    g = model.graph
    for t in sorted(g.initializer, key=lambda t: t.name):
        if t.data_location == TensorProto.EXTERNAL:
            raise ModelError(f"initializer {t.name!r} keeps its values in an external file; exported models "
                             "are self-contained. The file was edited after export: re-export the model.")
        add(b"init", json.dumps([t.name, t.data_type, list(t.dims)]).encode())
        # raw_data is what the exporter writes; typed fields (float_data...) are read as the
        # same little-endian bytes, so the digest does not depend on how values are stored.
        add(b"data", t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes())
    for kind, items in ((b"node", g.node), (b"input", g.input), (b"output", g.output),
                        (b"sparse", g.sparse_initializer), (b"function", model.functions),
                        (b"opset", model.opset_import)):
        for item in items:
            add(kind, item.SerializeToString(deterministic=True))
    return h.hexdigest()


def metadata_digest(props: Mapping[str, str]) -> str:
    """SHA-256 (hex) of every ``perceptual_engine.*`` key and value except ``integrity``."""
    items = sorted((k, v) for k, v in props.items() if k.startswith(PREFIX) and k != PREFIX + "integrity")
    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(b"perceptual-engine metadata v1\0" + text.encode("utf-8")).hexdigest()


def seal(model: Any, info: ModelInfo) -> None:
    """Write ``info`` into ``model``'s metadata_props with both digests. Call it on the
    final model, after every change to its graph."""
    import dataclasses

    import onnx

    props = dataclasses.replace(info, graph_sha256=graph_digest(model)).to_props()
    props[PREFIX + "integrity"] = metadata_digest(props)
    onnx.helper.set_model_props(model, props)


def read_model(path: str) -> ModelInfo:
    """The validated ModelInfo of the ONNX file at ``path``, its digests checked.

    Raises ModelError if the file is unreadable, not ours, has invalid metadata
    (naming the key) or was changed after export.
    """
    import onnx

    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):  # a device such as /dev/zero would never end
                raise ModelError(f"{path!r} is not a regular file; give the path of an exported .onnx file.")
            data = fh.read()  # identity and content from one open file
        model = onnx.load_model_from_string(data)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{path!r} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); it may "
            "be truncated or another kind of file. Re-export it with perceptual-engine export."
        ) from exc
    del data
    props: dict[str, str] = {}
    for p in model.metadata_props:
        if p.key in props and p.key.startswith(PREFIX):
            raise ModelError(f"{path}: metadata key {p.key} appears twice; an exported model has each key "
                             "once. The file was edited after export: re-export the model.")
        props[p.key] = p.value
    info = ModelInfo.from_props(props, path)
    # ctime too: a rewrite in place with size and mtime restored still changes it.
    identity = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    check(model, props, path, identity)
    return info


def check(model: Any, props: Mapping[str, str], path: str, identity: tuple[Any, ...] | None = None) -> None:
    """Compare both digests recorded in ``props`` with ``model``; raise ModelError if
    either differs. ``identity``: a key under which a verified graph is remembered."""
    if metadata_digest(props) != props[PREFIX + "integrity"]:
        raise ModelError(
            f"{path}: its metadata (spec, loss, input range, weights claims) does not match the integrity "
            "digest recorded at export: the file was edited after export, and its claims cannot be "
            "trusted. Re-export the model instead of editing it."
        )
    recorded = props[PREFIX + "graph_sha256"]
    with _LOCK:
        if identity is not None and _VERIFIED.get(identity) == recorded:
            return
    found = graph_digest(model)
    if found != recorded:
        raise ModelError(
            f"{path}: its weights or graph (SHA-256 {found[:16]}...) do not match the graph_sha256 recorded "
            f"at export ({recorded[:16]}...): the file was edited after export or damaged. Re-export the model."
        )
    if identity is not None:
        with _LOCK:
            if len(_VERIFIED) >= _MAX_CACHED:
                _VERIFIED.clear()
            _VERIFIED[identity] = recorded
