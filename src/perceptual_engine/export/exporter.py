"""export_onnx: torch -> ONNX, metadata, verification, then (only then) the file.

The model is written to a temporary file beside the destination, checked with
``onnx.checker`` (full check), run on ONNX Runtime CPU against the PyTorch float32
reference, and renamed over the destination only if every output is within
tolerance. A failed or interrupted export leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import torch

from .. import __version__, kinds, trunks as _trunks
from .._io import atomic_path, check_destination
from ..errors import ConfigError, ExportError
from ..lpips import LinearWeights
from ..reference import TorchFeatures
from ..spec import FeatureSpec, LossConfig
from ..weights import Weights, load_weights, restrict
from .graphs import GRAPH_KINDS, DistanceGraph, FeaturesGraph, StyleGraph, TargetGraph
from . import optimizer, shapes
from .integrity import seal
from .metadata import DTYPES, ModelInfo
from .verify import OutputParity, verify_model

# Max relative error (max |ort - ref| / max |ref|) accepted per output at export.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
# The same for grad.x: float16 backpropagates through the half network too.
GRAD_TOLERANCE = {"float32": 1e-4, "float16": 5e-2}
# The check runs on ONNX Runtime's CPU provider, which has no float16 Conv, ConvTranspose,
# Relu or MaxPool kernels: it inserts casts and computes those in float32. So a float16
# model's errors measure its float16 weights, inputs and outputs, not float16 arithmetic.
FP16_CPU_NOTE = ("ONNX Runtime's CPU provider computes float16 convolutions, ReLUs and pools in "
                 "float32, so these errors say nothing about float16 on a GPU (see docs/gpu.md).")


@dataclass(frozen=True)
class ExportResult:
    """What export_onnx wrote and what it measured."""

    path: str
    graph: str
    dtype: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    errors: dict[str, OutputParity] = field(default_factory=dict)
    size_bytes: int = 0
    weights_sha256: str = ""
    seconds: float = 0.0

    @property
    def max_rel_error(self) -> float:
        return max((e.max_rel for e in self.errors.values()), default=0.0)


def _example_size(spec: FeatureSpec) -> int:
    # Odd, larger than the minimum and not a multiple of the downsampling, so no
    # size can be mistaken for a constant by the tracer.
    return max(2 * spec.min_size + 5, 37)


def _to_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], inputs: tuple[str, ...],
             outputs: tuple[str, ...], dynamic: bool) -> onnx.ModelProto:
    dims = None
    if dynamic:
        # Dim.DYNAMIC rather than named Dims: named Dims make torch.export refuse
        # sizes where a pooled side becomes 1 (its 0/1 specialization), which the
        # ONNX graph handles fine. The axes are given their names afterwards.
        image = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
        dims = {n: image for n in inputs if n in ("x", "y")}
        if len(inputs) > len(dims):  # forward(x, *target): static Grams, content targets
            # A content target's sides follow x's (H // downsample): AUTO lets
            # torch.export record that relation instead of refusing it.
            side = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
            dims["target"] = tuple(side if n.startswith("target.content.") else None
                                   for n in inputs[len(dims):])
    # The exporter reports progress through print and logging; keep the caller's
    # output clean and show it only if the export fails.
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # torch.export first: torch.onnx.export turns the tuples of a
            # dynamic_shapes spec into lists, which torch.export then rejects.
            program = torch.export.export(module, args, dynamic_shapes=dims, strict=False)
            # optimize=False, then torch's optimizer with exact no-op rules: its own
            # drops Add(x, c) for |c| <= 1e-8, such as LPIPS' 1e-10 (see optimizer.py).
            prog = torch.onnx.export(
                program, args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
                external_data=False, optimize=False, verbose=False,
            )
            optimizer.optimize(prog.model)
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed ({type(exc).__name__}: {exc}). Exporter log:\n{buf.getvalue()[-2000:]}"
        ) from exc
    proto = prog.model_proto
    if dynamic:
        # No integer arithmetic into Reshape/Slice shapes: the CUDA provider computed
        # those wrong (shapes.py). Static exports fold them to constants already.
        shapes.static_shape_inputs(proto)
        _name_axes(proto)
    return proto


def _name_axes(proto: onnx.ModelProto) -> None:
    """Rename x's symbolic axes to batch/height/width everywhere they appear."""
    x = next(i for i in proto.graph.input if i.name == "x")
    xdims = x.type.tensor_type.shape.dim
    rename = {xdims[i].dim_param: new for i, new in ((0, "batch"), (2, "height"), (3, "width"))
              if xdims[i].dim_param}
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)


def export_onnx(
    spec: FeatureSpec,
    path: str | os.PathLike,
    *,
    graph: str = "features",
    loss: LossConfig | None = None,
    dtype: str = "float32",
    dynamic: bool = True,
    verify: bool = True,
    weights: Weights | None = None,
    progress: Callable[[str], None] | None = None,
    grad: bool = False,
    lpips_weights: "str | os.PathLike | LinearWeights | None" = None,
    spatial: bool = False,
    dists_weights: "str | os.PathLike | Any | None" = None,
    static_shape: tuple[int, int, int] | None = None,
    fp16_outputs: bool = False,
) -> ExportResult:
    """Export ``spec`` as a verified, self-contained ONNX file at ``path``.

    graph: "features" (input ``x``; one output per layer, named by the layer),
        "distance" (inputs ``x``, ``y``; outputs ``content.<l>``, ``style.<l>``,
        ``total``, each (N,) float32; ``loss`` defaults to content terms of weight 1
        on every layer) or "style" (inputs ``x`` and a cached target's Grams
        ``target.gram.<l>`` (1, C, C); outputs ``style.<l>``, ``total`` and x's Grams;
        ``loss`` with style terms only). Engine.set_style_target drives it.
        "lpips" (inputs ``x``, ``y``; outputs ``lpips.<l>`` per tap and ``total``, (N,)
        float32; ``spec`` must be VGG16 at ``perceptual_engine.lpips.LAYERS``, its
        input range is the images' ("-1,1" as lpips, "0,1" as its normalize=True)).
    lpips_weights: graph "lpips" only: the linear weights file (.pth), LinearWeights,
        or None for the installed lpips package's ``weights/v0.1/vgg.pth``.
    spatial: graph "lpips" only: also output the per-pixel map ``spatial`` (N, 1, H, W).
        "dists" (inputs ``x``, ``y`` in [0, 1]; outputs ``texture.<s>``, ``structure.<s>``
        per stage (``input`` and the five taps) and ``total``, (N,) float32; ``spec`` is
        ``perceptual_engine.dists.default_spec(weights)``: VGG16 with L2 pooling).
    dists_weights: graph "dists" only: the alpha/beta file (.pt), DistsWeights, or None
        for the installed DISTS_pytorch wheel's ``weights.pt``.
        "target" generalizes "style": inputs ``x``, ``target.content.<l>``
        (1, C, H_l, W_l) per content layer (x's feature size) and ``target.gram.<l>``
        (1, C, C) per style layer; outputs ``content.<l>``, ``style.<l>``, ``total``
        (N,), then x's ``feature.<l>`` and ``gram.<l>`` (to cache targets; see
        Engine.set_target). ``loss`` defaults to content terms of weight 1.
    grad: also output ``grad.x`` (N, 3, H, W) float32, ∂(Σ_n total_n)/∂x (x's half
        only), after the terms; "distance", "target" and "lpips" graphs. Verified
        against torch autograd of the reference like the other outputs.
    dtype: "float32" or "float16" (half-precision network; inputs, Grams,
        reductions and outputs in float32).
    dynamic: batch, height and width dynamic (named axes) if True.
    static_shape: (batch, height, width): export for exactly this input shape (every
        size a constant: fewer nodes, every normalizer folded, a fixed plan for CUDA
        graphs and cuDNN). The Engine refuses any other shape in one line. Graphs
        "features" and those that compare two images; implies dynamic=False; verified
        at that shape.
    fp16_outputs: graph "features" with dtype "float16" only: the taps leave the graph
        as float16 (no Cast to float32 and half the bytes to copy out).
    verify: run onnx.checker and the ONNX Runtime CPU parity check (recommended).
    Returns an ExportResult with the per-output errors measured.
    """
    if graph not in GRAPH_KINDS:
        raise ConfigError(f"graph {graph!r} is not accepted; accepted: {', '.join(GRAPH_KINDS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not accepted; accepted: {', '.join(DTYPES)}.")
    if grad and not kinds.get(graph).grad:
        raise ConfigError(f"grad=True needs {kinds.quoted(kinds.names(grad=True))} "
                          f"(a loss to differentiate); got graph={graph!r}. Export one of those, or drop grad=True.")
    if graph in ("distance", "target"):
        loss = loss if loss is not None else LossConfig.default_for(spec)
        loss.check_against(spec)
    elif graph == "style":
        if loss is None or not loss.style or loss.content:
            raise ConfigError(
                "graph='style' compares x with a cached style target, so it needs a loss with "
                "style terms only, e.g. LossConfig(style={'relu1_2': 1.0, 'relu2_2': 1.0}); "
                f"got {loss.to_dict() if loss else None}. Use graph='distance' for content terms."
            )
        loss.check_against(spec)
    elif loss is not None:
        raise ConfigError("loss is only used by graph='distance', 'target' or 'style'; drop it or export one of those.")
    kind = kinds.get(graph)
    head = kind.module()  # the lpips or dists package for a learned head
    given = {"lpips_weights": lpips_weights, "dists_weights": dists_weights}
    for option, value in given.items():
        if value is not None and option != kind.weights_option:
            owner = option.removesuffix("_weights")
            raise ConfigError(f"{option} is an option of graph='{owner}'; drop it or export graph='{owner}'.")
    if spatial and not kind.spatial:
        raise ConfigError(f"spatial is one of the options of {kinds.quoted(kinds.names(spatial=True))}; "
                          "drop it or export one of those.")
    if head is not None:
        head.check_spec(spec)
    trunk = _trunks.get(spec.arch)
    if grad and not trunk.grad:
        raise ConfigError(f"grad=True is not available on {spec.arch} yet: the hand-written backward "
                          f"(backward.py) has no VJPs for {trunk.label}'s modules. Export without grad "
                          f"(the forward is verified), or use arch {' or '.join(_trunks.names(grad=True))} "
                          "for gradients.")
    if grad and dtype == "float16" and not kind.fp16_grad:
        # Measured: the half-precision backward through VGG16 to relu5_3 (and LPIPS'
        # channel normalization) is ~0.5% off autograd at the median and ~10% at the
        # worst element, beyond the float16 gradient tolerance; no loss scale helps.
        raise ConfigError(f"grad=True for a {kind.label} graph needs dtype='float32': its float16 "
                          "gradient is not accurate to the verified tolerance. Export "
                          "float32 for gradients (the forward may stay float16).")
    if loss is not None:
        spec = _trim_to_loss(spec, loss)
    static_shape = _check_static_shape(static_shape, spec, graph)
    if fp16_outputs and (graph != "features" or dtype != "float16"):
        raise ConfigError(f"fp16_outputs needs graph='features' with dtype='float16' (got graph={graph!r}, "
                          f"dtype={dtype!r}): only feature maps are worth leaving as float16; terms stay "
                          "float32. Export a float16 features graph, or drop fp16_outputs.")
    path = os.fspath(path)
    check_destination(path, "export destination", "model.onnx")
    say = progress or (lambda msg: None)
    start = time.perf_counter()

    # Before the network: a missing lpips or DISTS_pytorch package fails fast.
    head_weights = head.resolve_weights(given[kind.weights_option], spec) if head is not None else None
    head_meta = {} if head is None else {kind.head: (head_weights.metadata(bool(spatial)) if kind.spatial
                                                     else head_weights.metadata())}
    say(f"loading {spec.arch} weights ({spec.weights})")
    weights = restrict(weights, spec) if weights is not None else load_weights(spec)
    reference = TorchFeatures(spec, weights=weights)  # float32: what the export is checked against
    traced = reference  # exporting does not modify the module
    if dtype == "float16":
        traced = TorchFeatures(spec, weights=weights)
        traced.body.half()
    info = ModelInfo(spec=spec, loss=loss, graph=graph, dtype=dtype,
                     weights_source=weights.source, weights_sha256=weights.sha256,
                     version=__version__, grad=grad, static_shape=static_shape,
                     output_dtype="float16" if fp16_outputs else None, **head_meta)
    if head is not None:
        module, reference = head.build(traced, spec, weights, head_weights, grad, spatial=bool(spatial))
    else:
        kind = {"features": FeaturesGraph, "distance": DistanceGraph, "style": StyleGraph, "target": TargetGraph}
        module = kind[graph](traced, *(() if graph == "features" else (loss,)),
                             *((grad,) if graph in ("distance", "target") else ()))
        if fp16_outputs:
            module.output_dtype = torch.float16
    inputs, outputs = info.input_names, info.output_names

    size = _example_size(spec)
    n, h, w = static_shape if static_shape is not None else (2, size, size + 2)
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.rand(n, 3, h, w, generator=g) for _ in ("x", "y")[: kinds.get(graph).images])
    args += tuple(torch.rand(1, *shape, generator=g) for shape in _target_shapes(spec, loss, graph, size))
    say(f"exporting {graph} graph ({dtype}{', static ' + 'x'.join(map(str, static_shape)) if static_shape else ''}) to ONNX")
    with logging_level(logging.ERROR):
        proto = _to_onnx(module, args, inputs, outputs, dynamic and static_shape is None)
    seal(proto, info)  # the metadata and the digests binding it to this graph

    errors: dict[str, OutputParity] = {}
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
        del proto
        if verify:
            say("verifying: onnx.checker (full) and ONNX Runtime CPU parity")
            tol = {"grad.x": GRAD_TOLERANCE[dtype]} if grad else {}
            errors = verify_model(tmp, reference, info, tolerance=TOLERANCE[dtype], tolerances=tol,
                                  shape=static_shape)
    say(f"wrote {path}")
    return ExportResult(
        path=path, graph=graph, dtype=dtype, inputs=inputs, outputs=outputs, errors=errors,
        size_bytes=os.path.getsize(path), weights_sha256=weights.sha256,
        seconds=time.perf_counter() - start,
    )


def _check_static_shape(shape: Any, spec: FeatureSpec, graph: str) -> tuple[int, int, int] | None:
    """(batch, height, width) as ints, or a ConfigError saying what is accepted."""
    from .metadata_rules import STATIC_SHAPE_KINDS

    if shape is None:
        return None
    if graph not in STATIC_SHAPE_KINDS:
        raise ConfigError(f"static_shape is for graph {', '.join(map(repr, STATIC_SHAPE_KINDS))}; a {graph} "
                          "graph also runs its target images (of other sizes) through the network. "
                          "Drop static_shape for it.")
    try:
        values = tuple(int(v) for v in shape)
        ok = len(values) == 3 and all(v == s and not isinstance(s, bool) for v, s in zip(values, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok or min(values) < 1 or max(values) > 65536:
        raise ConfigError(f"static_shape {shape!r} is not accepted; accepted: (batch, height, width), "
                          "three positive integers, e.g. (8, 224, 224).")
    if min(values[1:]) < spec.min_size:
        raise ConfigError(f"static_shape {values} has a side smaller than {spec.min_size}, the smallest "
                          f"{spec.deepest} takes; use sides of at least {spec.min_size}.")
    return values  # type: ignore[return-value]


def _trim_to_loss(spec: FeatureSpec, loss: LossConfig) -> FeatureSpec:
    """The spec cut to the layers the loss weighs, with a warning when that drops any:
    the model then computes (and its size check and weights hash cover) only those."""
    used = loss.used_spec(spec)
    if used is not spec:
        dropped = [n for n in spec.layers if n not in used.layers]
        warnings.warn(
            f"layers {dropped} are not used by the loss; the model extracts {list(used.layers)} "
            f"only and ends at {used.deepest} (smallest input side {used.min_size}).",
            UserWarning, stacklevel=3)
    return used


def _target_shapes(spec: FeatureSpec, loss: LossConfig | None, graph: str, size: int) -> list[tuple[int, ...]]:
    """Shapes (without batch) of the target inputs for an example x of size x (size + 2)."""
    from ..layers import resolve

    if graph not in ("style", "target") or loss is None:
        return []
    shapes: list[tuple[int, ...]] = []
    if graph == "target":
        for n in loss.content:
            info = resolve(spec.arch, n)
            shapes.append((info.channels, info.size(size), info.size(size + 2)))
    return shapes + [(resolve(spec.arch, n).channels,) * 2 for n in loss.style]


@contextlib.contextmanager
def logging_level(level: int):
    """Quiet torch's and onnxscript's loggers during export; restore them after."""
    names = ("torch", "torch.onnx", "torch.export", "onnxscript")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(level)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)
