"""Engine: an exported model on a backend (ONNX Runtime or OpenVINO), called with numpy
arrays or torch tensors. The backend only runs feeds; validation, the memory budget,
cached targets, NaN handling and metadata are here, the same for every backend.

The parts: engine_open.py (the model file, ``read_info``, the OpenVINO backend, the
estimate's fixed terms), finite.py (NaN/Inf samples of a distance call); ``read_info``
is re-exported here, the path callers use."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from .. import kinds
from .._io import sha256_file
from ..errors import ConfigError, DeviceError, InputError, ModelError, NonFiniteInputError, PerceptualError
from .. import memory as _memory
from ..validate import MAX_BATCH_PIXELS, check_pair, check_tensor
from . import providers as P
from . import targets as T
from .backends import onnxruntime as _ort
from .engine_open import (_check_ort_precision, _nhw, _openvino_backend, check_model_file, check_names,
                          check_static_shape, memory_args, read_info)
from .finite import _check_finite, distance_finite_samples
from .host import to_host as _to_host
from .iobinding import GATE, TorchBinder

__all__ = ["DEVICES", "Engine", "read_info"]

DEVICES = (*P.DEVICES, "openvino")


class Engine:
    """Run an exported perceptual-engine model.

    path: an ONNX file from ``export_onnx``; its metadata supplies spec and loss.
    device: "auto" (TensorRT, then CUDA, then CPU), "cpu" (ONNX Runtime, exact fp32),
        "cuda", "tensorrt" or "openvino" (OpenVINO on the CPU, the ``[openvino]`` extra;
        docs/openvino.md). An explicit device that cannot be used raises DeviceError;
        never a silent CPU run. ``providers`` says what really runs.
    precision: "auto", "f32" or "bf16", for device="openvino" ("auto": bf16 where the
        CPU reports BF16 and the model passes the bf16 check, else f32, with the reason in
        ``precision_note``; f32 for gradient graphs); ONNX Runtime devices take "auto" or
        "f32". OpenVINO's outputs are checked against ONNX Runtime fp32 once per model,
        within the precision's tier; a model outside it raises PrecisionError.
    options: ProviderOptions for CUDA/TensorRT (tf32, fixed shapes, caches, ...).
        ``engine.options`` holds what the providers really get, ``engine.requested_options``
        what was passed; ``engine.option_notes`` says why they differ (a float16 model
        keeps its tensor cores: ``tf32=False`` is not applied to it, docs/gpu.md).
    check_range: refuse host inputs outside the model's input range (see README).
    max_pixels: refuse a call whose N·H·W exceeds it, before any work.
    cpu_arena: ONNX Runtime's CPU memory arena. Default: on for fixed shapes
        (``options.fixed_shapes``), off otherwise, since an arena sized by every
        shape seen keeps the largest (see README, "Memory").
    spin: ONNX Runtime's CPU worker threads busy-wait between parallel sections (its
        default, the lowest latency of one call). False lets them sleep instead: the
        cores stay free for other work of the machine (an HTTP server's processes), and
        small calls cost less CPU (``perceptual-engine serve`` runs with False).
    memory_budget: refuse a call whose estimated peak memory exceeds it, before any
        work (MemoryBudgetError). None: 80% of the memory available on the device
        (MemAvailable on CPU, free GPU memory on CUDA), read only for calls estimated
        above 256 MiB; bytes (int); a fraction (float in (0, 1]); "4G", "50%"; 0 or
        False: no budget. Settable later (``engine.memory_budget = "8G"``). See
        docs/memory.md for the estimate. An allocation failure inside ONNX Runtime
        raises OutOfMemoryError.

    Safe to call from several threads. With ``options.cuda_graph`` the capture
    happens once, on the first torch call, while every other Engine call in the
    process waits; other GPU work (torch) must not run during that first call.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", *,
                 options: P.ProviderOptions | None = None, threads: int | None = None,
                 check_range: bool = True, max_pixels: int | None = MAX_BATCH_PIXELS,
                 cpu_arena: bool | None = None, memory_budget: Any = None,
                 precision: str = "auto", spin: bool = True) -> None:
        self.path = os.fspath(path)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r} is not accepted; accepted: None (the backend's "
                              "default, every core) or an integer >= 1.")
        self.options = options or P.ProviderOptions()
        if device != "cpu":  # run on torch's stream when torch already uses CUDA (iobinding.py)
            self.options = P.with_torch_stream(self.options)
        self.check_range = check_range
        self.max_pixels = max_pixels
        self.cpu_arena = self.options.fixed_shapes if cpu_arena is None else cpu_arena
        check_model_file(self.path)
        # Metadata first, from a CPU-free read of the header: the spec names the inputs.
        self.info = read_info(self.path)
        self.inputs = self.info.input_names
        self.requested_options = options or P.ProviderOptions()
        self.option_notes: tuple[str, ...] = ()
        if device != "openvino":  # what ONNX Runtime's providers get for this model's dtype
            self.options, self.option_notes = P.for_model(self.options, self.info.dtype)
        # The main session never captures CUDA graphs: numpy calls, other shapes and
        # set_style_target run here; the TorchBinder keeps a separate session for the
        # one captured shape (ONNX Runtime replays a captured graph on every later run
        # of its session, whatever the inputs).
        if device not in DEVICES:
            raise ConfigError(f"device {device!r} is not accepted; accepted: {', '.join(DEVICES)}.")
        self.device = device
        self.fallback_reason = ""
        if device == "openvino":
            self.session = None
            self.backend: Any = _openvino_backend(self.path, self.info, precision, threads,
                                                  self._check_names)
        else:
            _check_ort_precision(device, precision)
            self._session_opts = _ort.session_options(threads, self.cpu_arena, spin)
            self.session, self.fallback_reason = self._open_session(
                device, dataclasses.replace(self.options, cuda_graph=False))
            self.backend = _ort.OrtBackend(self.session, self.options.device_id)
            want = P.PROVIDER.get(device)
            if device != "auto" and want not in self.backend.providers:
                raise DeviceError(_ort.why_not(device, None, got=self.backend.providers))
            self._check_outputs()
        self.providers: list[str] = list(self.backend.providers)
        # Why precision "auto" ran f32 where bf16 was asked of the CPU (OpenVINO), else "".
        self.precision_note: str = getattr(self.backend, "precision_note", "")
        self._binder = TorchBinder(self) if self.on_gpu else None
        self._target: T.Target | None = None  # cached targets, on the session's device; swapped whole
        self.memory_budget = memory_budget

    # -- memory (docs/memory.md) -----------------------------------------------
    @property
    def memory_budget(self) -> Any:
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: Any) -> None:
        self._memory = _memory.MemoryGuard(value, "cuda" if self.on_gpu else "cpu", self.options.device_id)
        self._memory_budget = value
        self._memory_args = memory_args(self)  # what the estimate needs besides the shape

    def estimate_memory(self, n: int, height: int, width: int) -> "_memory.MemoryEstimate":
        """Upper bound of the peak memory of a call on n images (pairs) of height x width."""
        return _memory.estimate(self.spec, self.info.graph, int(n), int(height), int(width),
                                **self._memory_args)

    def memory_limit(self) -> int | None:
        """The memory budget in bytes now, or None (none set, or available memory unknown)."""
        return self._memory.limit()

    def _open_session(self, device: str, options: P.ProviderOptions) -> tuple[Any, str]:
        """An ONNX Runtime session for ``device`` (backends/onnxruntime.py)."""
        # TensorRT's optimization profile covers every dynamic input: the images and
        # a target graph's content features; the style Grams (1, C, C) are static.
        dynamic = [] if self.info.static_shape else P.profile_inputs(self.spec.arch, self.inputs)
        return _ort.open_session(self.path, device, options, self._session_opts, dynamic,
                                 lambda: sha256_file(self.path)[:16])

    def _open_graph_session(self) -> Any:
        """A session with CUDA graphs on, for the provider the main session runs."""
        device = {v: k for k, v in P.PROVIDER.items()}[self.providers[0]]
        # Its own stream: CUDA cannot capture on the legacy default stream, and a
        # capture on torch's stream would record torch's work too.
        session, _ = self._open_session(device, dataclasses.replace(self.options, cuda_graph=True,
                                                                     user_stream=None))
        return session

    # -- introspection -------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        return self.backend.on_gpu

    def describe(self) -> str:
        """What runs this model, in words (backend, version, precision or providers), and
        any option that was not applied as asked (``option_notes``)."""
        return "; ".join((self.backend.describe(), *self.option_notes))

    @property
    def spec(self):
        return self.info.spec

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.info.output_names

    def _check_outputs(self) -> None:
        self._check_names(tuple(o.name for o in self.session.get_outputs()),
                          tuple(i.name for i in self.session.get_inputs()))

    def _check_names(self, got: tuple[str, ...], ins: tuple[str, ...]) -> None:
        check_names(self.path, self.info, self.inputs, got, ins)

    # -- calls ---------------------------------------------------------------
    def _check(self, *arrays: Any, name: str = "x") -> None:
        kw = dict(dtypes=("float32",), max_pixels=self.max_pixels, check_range=self.check_range)
        if len(arrays) == 1:
            check_tensor(arrays[0], name, self.spec, **kw)
        else:
            check_pair(arrays[0], arrays[1], self.spec, **kw)
        if self.info.static_shape is not None:
            check_static_shape(self.path, self.info.static_shape, arrays[0], name)
        self._memory.check(self.estimate_memory(*_nhw(arrays[0])))

    def _run(self, feeds: dict[str, Any], names: tuple[str, ...] | None = None,
             target: "T.Target | None" = None) -> dict[str, Any]:
        """Run on ``feeds``; ``names`` picks outputs (all by default). A cached
        ``target``'s feeds are added as device-resident OrtValues."""
        names = names or self.output_names
        try:
            out = self._run_unguarded(feeds, names, target)
        except Exception as exc:  # an allocation failure becomes a typed error, with the fix
            if isinstance(exc, PerceptualError) or not _memory.is_out_of_memory(exc):
                raise
            est = self.estimate_memory(*_nhw(feeds["x"]))
            raise _memory.out_of_memory(exc, est, self.providers[0]) from exc
        if self._memory.kind == "fraction":
            self._memory.ran(self.estimate_memory(*_nhw(feeds["x"])))
        return out

    def _run_unguarded(self, feeds: dict[str, Any], names: tuple[str, ...],
                       target: "T.Target | None") -> dict[str, Any]:
        extra = target.feeds if target is not None else {}
        if self._binder is not None and self._binder.accepts(feeds):
            return self._binder.run(feeds, extra, names)
        host = {k: _to_host(v) for k, v in feeds.items()}
        # Host calls copy to and from the GPU: not while a CUDA graph is captured.
        with GATE.shared() if self.on_gpu else contextlib.nullcontext():
            return self.backend.run_cached(host, extra, names)

    def features(self, x: Any) -> dict[str, Any]:
        """{layer: (N, C, H_l, W_l) float32} for x (N, 3, H, W) float32 in the input range.

        numpy in -> numpy out; CUDA torch tensors in -> CUDA torch tensors out. CUDA
        results alias buffers the Engine reuses for a later call only once nothing holds
        them any more (not the dict, a view, a numpy array or an autograd save): a result
        you keep is never overwritten (docs/gpu.md, "IO binding").
        """
        if self.info.graph != "features":
            raise ModelError(f"{self.path!r} is a {self.info.graph} graph; features() needs a model exported "
                             "with graph='features'. Use distance(x, y), or export a features graph.")
        self._check(x)
        return self._run({"x": x})

    def distance(self, x: Any, y: Any = None) -> dict[str, Any]:
        """Per-sample terms {"content.<l>", "style.<l>", "total"}: each (N,) float32,
        and ``grad.x`` (N, 3, H, W) float32, ∂(Σ_n total_n)/∂x, if the model was
        exported with ``grad=True`` (its finiteness is not checked).

        On an LPIPS model (graph="lpips"): {"lpips.<l>", "total"} (N,), and "spatial"
        (N, 1, H, W) when it was exported with spatial=True. On a DISTS model
        (graph="dists"): {"texture.<s>", "structure.<s>", "total"} (N,).

        On a style or target model (graph="style"/"target") y is omitted: x is
        compared with the targets given to ``set_target``/``set_style_target``, and
        only x runs through the network.
        A sample whose input holds NaN/Inf is not computed: the others are, and a
        NonFiniteError names the bad samples and carries every term in ``.out``
        (NaN for the bad samples).
        """
        try:
            return self._distance(x, y)
        except NonFiniteInputError as exc:
            return distance_finite_samples(self._distance, x, y, exc)

    def _distance(self, x: Any, y: Any = None) -> dict[str, Any]:
        if self.info.graph in ("style", "target"):
            if y is not None:
                call = "set_style_target(y)" if self.info.graph == "style" else "set_target(content=, style=)"
                raise InputError(f"this is a {self.info.graph} model: call distance(x) after {call}, "
                                 "or export graph='distance' to compare x with y directly.")
            target = self._target  # one read: a concurrent set_target swaps the whole object
            T.check_ready(self, target, x)
            self._check(x)
            out = self._run({"x": x}, self.info.term_names, target)
        elif kinds.get(self.info.graph).compares:
            if y is None:
                raise InputError(f"distance(x, y) needs y on a {self.info.graph} model; pass y.")
            self._check(x, y)
            out = self._run({"x": x, "y": y}, self.info.term_names)
        else:
            raise ModelError(f"{self.path!r} is a features graph; distance() needs a model exported "
                             f"with {kinds.quoted(kinds.names(compares=True) + ('target', 'style'))} "
                             "(perceptual-engine export --graph distance).")
        _check_finite(out)
        return out

    def matrix(self, x: Any, y: Any = None, **options: Any) -> dict[str, Any]:
        """All-pairs distances {term: (N, M) float32, "total"} of images x (N, 3, H, W) against
        y (M, 3, H, W), or x against itself (symmetric, zero diagonal) when y is None; an
        lpips or distance model, one forward pass per image. Options and precision:
        docs/matrix.md (runtime/matrix.py)."""
        from .matrix import matrix

        return matrix(self, x, y, **options)

    def set_target(self, content: Any = None, style: Any = None) -> None:
        """Cache targets for ``distance(x)`` on a target graph (graph="target").

        content: an image (1, 3, H, W) float32 (numpy or torch) whose features at the
            content layers x is compared with; x must then give features of the same
            size (an image of x's size). style: an image (1, 3, H', W') of any size
            whose Grams x's are compared with. ``None`` keeps the current one (there
            is none at first); the two may come from different images. The new
            targets are computed first and swapped in at once: a concurrent
            ``distance`` sees the old targets or the new ones.
        """
        if self.info.graph == "style":
            if content is not None:
                raise ModelError(f"{self.path!r} is a style graph (style terms only); it takes no content "
                                 "target. Export graph='target' for content and style targets.")
            return self.set_style_target(style)
        if self.info.graph != "target":
            raise ModelError(f"{self.path!r} is a {self.info.graph} graph; set_target needs a model exported "
                             "with graph='target' (perceptual-engine export --graph target).")
        self._swap(T.build(self._target_context(), self._target, content, style))

    def set_style_target(self, image: Any) -> None:
        """Compute the Grams of ``image`` (1, 3, H, W) once and keep them on the device.

        Later ``distance(x)`` calls run the network on x only. Needs a model
        exported with graph="style" or "target" (there: ``set_target(style=image)``).
        """
        if self.info.graph == "target":
            return self.set_target(style=image)
        if self.info.graph != "style":
            raise ModelError(f"{self.path!r} is a {self.info.graph} graph; set_style_target needs a model "
                             "exported with graph='style' (a style-only loss) or graph='target'.")
        self._swap(T.build(self._target_context(), None, None, image))

    def _target_context(self) -> "T.Context":
        return T.Context(path=self.path, info=self.info, inputs=self.inputs, check=self._check,
                         run=getattr(self.backend, "run_exact", self.backend.run),  # targets in f32
                         keep=self.backend.keep, on_gpu=self.on_gpu)

    def _swap(self, target: T.Target) -> None:
        self._target = target
        if self._binder is not None:
            self._binder.reset()  # a captured graph holds the old target's buffers

    def __repr__(self) -> str:
        return f"Engine({self.path!r}, graph={self.info.graph}, providers={self.providers})"
