"""A Triton Inference Server model repository for an exported model.

``write_triton_repo(model, repo, name)`` writes ``repo/name/config.pbtxt`` and
``repo/name/1/model.onnx``. The config is derived from the ONNX graph itself (names,
element types, ranks, which axis is the batch) and from the model's metadata (graph
kind, spec, loss), so every graph kind gets a correct config without a table here:

- platform ``onnxruntime_onnx``; tensors named and typed as in the graph.
- When every input and output starts with the same dynamic batch axis, Triton batches:
  ``max_batch_size`` > 0, the batch axis left out of ``dims``, dynamic batching on.
  A per-sample output of shape (N,) is declared ``dims: [1]`` with ``reshape: { shape: [] }``.
  A graph with unbatched inputs (the style graph's target Grams, (1, C, C)) is served
  with ``max_batch_size: 0`` and full shapes: Triton would otherwise stack the target
  of every request into a batch the graph does not accept.
- The TensorRT accelerator: FP16 (FP32 for raw "none" Grams, LPIPS and gradient graphs: see
  trt_precision),
  workspace, engine cache and an optimization profile for the image inputs.
- Warmup with random images of the profile's "opt" size (and cached target features
  of the matching size), so the first request does not pay for building the TensorRT
  engine.

The written config is parsed back with Triton's own protobuf schema
(``tritonclient.grpc.model_config_pb2``, the ``perceptual-engine[triton]`` extra) and
compared with the ONNX graph (names, data types, ranks). Without tritonclient that
check is skipped and the result says so (``checked=False``): the config is still
derived from the graph, and a serving machine need not install a client library
at export time.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from .. import kinds
from .._io import atomic_path, sha256_file
from ..errors import ConfigError, ExportError

# ONNX TensorProto element type -> Triton DataType name.
TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
# Triton finds a model by its folder's name and requires the config's ``name`` to equal
# it once config.pbtxt is parsed ("unexpected directory name ..., directory name must
# equal model name", model_repository_manager.cc). Accepted here: the portable subset
# of such names, which also survive URLs (/v2/models/NAME), shells and other file
# systems unchanged: ASCII letters, digits, '_', '.', '-', starting with a letter or digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_name(name: str) -> str:
    """``name`` if Triton can serve a model folder of that name; else ConfigError saying why."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"Triton model name {name!r} {why}; accepted: ASCII letters, digits, "
                           "'_', '.' and '-', starting with a letter or digit (the folder name, "
                           "which Triton requires to equal the name in config.pbtxt). Give "
                           "another name (--triton-name).")

    if not isinstance(name, str) or name == "":
        raise ConfigError("the Triton model name is empty; give a name (--triton-name NAME), or "
                          "leave --triton-name out for the stem of the model file.")
    if name in (".", ".."):
        raise refuse("is not a folder name of its own")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise refuse("holds a path separator: a model is one folder directly in the repository")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise refuse("holds a control character (a newline or tab?)")
    if not name.isascii():
        raise refuse("holds non-ASCII characters")
    if not _NAME.fullmatch(name):
        raise refuse("is not accepted")
    return name


def check_repo_entry(repo: str | os.PathLike, name: str, model: str | os.PathLike | None = None
                      ) -> str:
    """Refuse, before anything is exported, a repository entry that cannot be written:
    a bad ``name`` (check_model_name), a ``repo`` that is a file (or under one) or not
    writable, and a ``repo/name`` that exists unless it holds ``model`` itself (the
    same bytes: a rerun). Returns the folder ``repo/name``."""
    check_model_name(name)
    repo = os.fspath(repo)
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise ConfigError(f"--triton-repo {repo!r} is a file, not a folder; give a folder (it is "
                          "created if missing).")
    existing = os.path.abspath(repo)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--triton-repo {repo!r} cannot be created: {existing!r} is a file; "
                          "give a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--triton-repo {repo!r}: the folder {existing!r} is not writable; give "
                          "another folder.")
    folder = os.path.join(repo, name)
    if os.path.lexists(folder):
        target = os.path.join(folder, "1", "model.onnx")
        same = (model is not None and os.path.isfile(model) and os.path.isfile(target)
                and sha256_file(target) == sha256_file(model))
        if not same:
            what = ("another model" if os.path.isfile(target) else
                    "something else (no 1/model.onnx)" if os.path.isdir(folder) else "a file")
            raise ConfigError(f"{folder!r} already exists and holds {what}; a Triton model name "
                              "is one model. Give another name (--triton-name), or remove that "
                              "folder first.")
    return folder


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton DataType name
    shape: tuple[int | str, ...]  # ints for static axes, the symbol's name for dynamic ones


@dataclass(frozen=True)
class TritonRepo:
    """What ``write_triton_repo`` wrote and whether Triton's schema checked it."""

    folder: str  # repo/name
    config: str  # repo/name/config.pbtxt
    model: str  # repo/name/1/model.onnx
    max_batch_size: int
    checked: bool
    note: str = ""  # why the check was skipped
    inputs: tuple[Tensor, ...] = field(default_factory=tuple)
    outputs: tuple[Tensor, ...] = field(default_factory=tuple)


def _tensors(values) -> tuple[Tensor, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in TRITON_DTYPES:
            raise ExportError(f"tensor {v.name!r} has ONNX element type {t.elem_type}, which has no "
                              f"Triton data type here; accepted: {sorted(TRITON_DTYPES)}.")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in t.shape.dim)
        out.append(Tensor(v.name, TRITON_DTYPES[t.elem_type], shape))
    return tuple(out)


def graph_tensors(path: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(inputs, outputs) of an ONNX file, from its graph (weights not loaded)."""
    proto = onnx.load(path, load_external_data=False)
    return _tensors(proto.graph.input), _tensors(proto.graph.output)


def _batch_axis(inputs, outputs) -> str | None:
    """The symbol every tensor's first axis shares, if any: Triton may batch on it."""
    firsts = {t.shape[0] if t.shape else None for t in (*inputs, *outputs)}
    if len(firsts) == 1:
        (axis,) = firsts
        if isinstance(axis, str):
            return axis
    return None


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _list(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def trt_precision(info: Any) -> str:
    """TensorRT's precision_mode for the model: FP16 only where a float16 build is
    known to hold. FP32 for raw ("none") Grams, which overflow float16; for LPIPS,
    whose head overflows it (docs/lpips.md); and for gradient graphs, whose float16
    backward has no GPU parity run yet (scripts/gpu_check.py measures it)."""
    raw_grams = info.loss is not None and info.loss.gram == "none" and bool(info.loss.style)
    if raw_grams or kinds.get(info.graph).tensorrt_fp32 or getattr(info, "grad", False):
        return "FP32"
    return "FP16"


def render_config(name: str, inputs, outputs, *, max_batch_size: int, precision: str,
                  min_hw: int, opt_hw: int, max_hw: int, workspace_bytes: int,
                  engine_cache: str, profile_batch: int = 16,
                  features: dict[str, tuple[int, Callable[[int], int]]] | None = None,
                  instances: int = 1) -> str:
    """The config.pbtxt text (Triton's protobuf text format).

    features: inputs that are feature maps of the image, (1, C, size(H), size(W)), by
        name -> (C, size), size the layer's exact side (LayerInfo.size); their profile and
        warmup shapes follow the image's.
    """
    batched = max_batch_size > 0
    features = features or {}
    images = [t for t in inputs if len(t.shape) == 4 and t.shape[1] == 3]
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]

    def tensor(kind: str, t: Tensor) -> list[str]:
        shape = t.shape[1:] if batched else t.shape
        block = [f"{kind} {{", f'  name: "{t.name}"', f"  data_type: {t.dtype}"]
        if batched and not shape:  # one value per sample: Triton needs a non-empty dims
            block += ["  dims: [ 1 ]", "  reshape: { shape: [ ] }"]
        else:
            block.append(f"  dims: {_list(_dims(shape))}")
        return block + ["}"]

    for t in inputs:
        lines += tensor("input", t)
    for t in outputs:
        lines += tensor("output", t)
    lines += ["instance_group [ {", f"  count: {instances}", "  kind: KIND_GPU", "} ]"]
    if batched:
        preferred = sorted({b for b in (max_batch_size // 2, max_batch_size) if b >= 1})
        lines += ["dynamic_batching {", f"  preferred_batch_size: {_list(preferred)}",
                  "  max_queue_delay_microseconds: 2000", "}"]
    top = max(profile_batch, 1)

    def profile(n: int, hw: int) -> str:
        shapes = [f"{t.name}:{n}x3x{hw}x{hw}" for t in images]
        shapes += [f"{k}:1x{c}x{size(hw)}x{size(hw)}" for k, (c, size) in features.items()]
        return ",".join(shapes)

    params = {"precision_mode": precision, "max_workspace_size_bytes": str(workspace_bytes),
              "trt_engine_cache_enable": "1", "trt_engine_cache_path": engine_cache,
              "trt_profile_min_shapes": profile(1, min_hw),
              "trt_profile_opt_shapes": profile(max(1, top // 2), opt_hw),
              "trt_profile_max_shapes": profile(top, max_hw)}
    lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [ {",
              '      name: "tensorrt"']
    lines += [f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items()]
    lines += ["    } ]", "  }", "}"]
    # Warmup: one request of random images at the opt size (plus the static inputs),
    # so TensorRT builds its engine at load time, not on the first client's request.
    lines += ["model_warmup [ {", '  name: "random_opt_size"', "  batch_size: 1"]
    for t in inputs:
        if t in images:
            shape = [3, opt_hw, opt_hw] if batched else [1, 3, opt_hw, opt_hw]
        elif t.name in features:
            c, size = features[t.name]
            shape = [1, c, size(opt_hw), size(opt_hw)]
        else:
            shape = [1 if isinstance(d, str) else d for d in (t.shape[1:] if batched else t.shape)]
        lines += [f'  inputs {{ key: "{t.name}" value: {{ data_type: {t.dtype} '
                  f"dims: {_list(shape)} random_data: true }} }}"]
    lines += ["} ]"]
    return "\n".join(lines) + "\n"


def check_config(text: str, inputs, outputs) -> tuple[bool, str]:
    """Parse ``text`` with Triton's ModelConfig schema and compare it with the graph.

    Returns (True, "") when checked, (False, why) when tritonclient is missing;
    raises ExportError on any disagreement.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError as exc:
        return False, (f"not checked against Triton's schema: tritonclient is not installed "
                       f"({exc}); pip install 'perceptual-engine[triton]' to check it")
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ExportError(f"the Triton config does not parse with Triton's schema: {exc}") from exc
    batched = config.max_batch_size > 0
    problems = []
    for kind, declared, graph in (("input", config.input, inputs), ("output", config.output, outputs)):
        names = [d.name for d in declared]
        if names != [t.name for t in graph]:
            problems.append(f"{kind}s {names} vs the graph's {[t.name for t in graph]}")
            continue
        for d, t in zip(declared, graph):
            dtype = mc.DataType.Name(d.data_type)
            if dtype != t.dtype:
                problems.append(f"{kind} {t.name}: {dtype} vs the graph's {t.dtype}")
            dims = list(d.reshape.shape) if d.HasField("reshape") else list(d.dims)
            rank = len(dims) + batched
            if rank != len(t.shape):
                problems.append(f"{kind} {t.name}: rank {rank} vs the graph's {len(t.shape)}")
            elif any(c != g for c, g in zip(dims, _dims(t.shape[batched:]))):
                problems.append(f"{kind} {t.name}: dims {dims} vs the graph's {list(t.shape)}")
    if problems:
        raise ExportError("the Triton config disagrees with the ONNX graph: " + "; ".join(problems))
    return True, ""


def write_triton_repo(model: str | os.PathLike, repo: str | os.PathLike, name: str | None = None,
                      *, max_batch_size: int = 16, profile_hw: tuple[int, int, int] | None = None,
                      workspace_bytes: int = 1 << 30, engine_cache: str | None = None) -> TritonRepo:
    """Write a Triton model repository entry for an exported model.

    model: an ONNX file written by ``export_onnx`` (its metadata is read).
    repo / name: writes ``repo/name/config.pbtxt`` and ``repo/name/1/model.onnx``; name
        (None: the model file's stem) follows ``check_model_name``. An existing
        ``repo/name`` holding another model, or a ``repo`` that is a file, is refused
        (ConfigError, ``check_repo_entry``); one holding this very model gets a fresh config.
    max_batch_size: the largest batch Triton forms (batched graphs only).
    profile_hw: (min, opt, max) image side in pixels for the TensorRT profile
        (default: the model's minimum size, 224, 512).
    engine_cache: where TensorRT engines are cached on the server
        (default: ``/tmp/triton-trt-cache/<name>``).
    """
    from .. import layers as _layers
    from .integrity import read_model

    model = os.fspath(model)
    info = read_model(model)  # ModelError for a file that is not ours
    if name is None:  # only None: an empty name is refused, not replaced
        name = os.path.splitext(os.path.basename(model))[0]
    check_repo_entry(repo, name, model)
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size={max_batch_size}; accepted: an integer >= 1.")
    lo, opt, hi = profile_hw or (info.spec.min_size, 224, 512)
    if not lo <= opt <= hi:
        raise ConfigError(f"profile_hw={profile_hw}; accepted: (min, opt, max) with min <= opt <= max.")
    inputs, outputs = graph_tensors(model)
    batched = _batch_axis(inputs, outputs) is not None
    # A target graph's cached content features are (1, C, size(H), size(W)) of the image's.
    features = {}
    for t in inputs:
        if t.name.startswith("target.content."):
            layer = _layers.resolve(info.spec.arch, t.name[len("target.content."):])
            features[t.name] = (layer.channels, layer.size)
    text = render_config(name, inputs, outputs, max_batch_size=max_batch_size if batched else 0,
                         precision=trt_precision(info), min_hw=lo, opt_hw=opt,
                         max_hw=hi, workspace_bytes=workspace_bytes, profile_batch=max_batch_size,
                         features=features,
                         engine_cache=engine_cache or f"/tmp/triton-trt-cache/{name}")
    checked, note = check_config(text, inputs, outputs)

    repo = os.fspath(repo)
    folder = os.path.join(repo, name)
    target = os.path.join(folder, "1", "model.onnx")
    sha = sha256_file(model)
    if os.path.exists(folder):
        if not os.path.isfile(target) or sha256_file(target) != sha:
            what = "another model" if os.path.isfile(target) else "no 1/model.onnx of ours"
            raise ConfigError(f"{folder!r} already exists and holds {what}; a Triton model name "
                              "is one model. Give another name (--triton-name), or remove that "
                              "folder first.")
        with atomic_path(os.path.join(folder, "config.pbtxt")) as tmp:  # same model: new config
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
    else:
        # Built beside its destination and renamed into place: Triton (which may poll
        # the repository) never sees a model folder without its config or its file.
        os.makedirs(repo, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo)
        try:
            os.makedirs(os.path.join(staging, "1"))
            shutil.copyfile(model, os.path.join(staging, "1", "model.onnx"))
            with open(os.path.join(staging, "config.pbtxt"), "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(staging, 0o755)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return TritonRepo(folder=folder, config=os.path.join(folder, "config.pbtxt"), model=target,
                      max_batch_size=max_batch_size if batched else 0, checked=checked, note=note,
                      inputs=inputs, outputs=outputs)
