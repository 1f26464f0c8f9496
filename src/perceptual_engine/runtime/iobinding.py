"""Zero-copy CUDA torch tensors in and out of ONNX Runtime through IO binding.

Inputs are bound by pointer (made contiguous NCHW first: channels_last or strided
tensors would otherwise be misread); outputs are preallocated torch tensors that
ONNX Runtime writes into.

Streams: when the session runs on torch's current stream (``user_compute_stream``,
set by the Engine when torch had initialized CUDA first), the run is ordered
after torch's work and before torch's next work by the stream itself: no host
synchronization at all (RunOptions ``disable_synchronize_execution_providers``),
so training overlaps Python with the GPU. On any other stream the caller's stream
is synchronized before the run and ONNX Runtime synchronizes its own after it.

CUDA graphs (``ProviderOptions(cuda_graph=True)``): the first (batch, height,
width) seen is captured in a session of its own (ONNX Runtime replays a session's
captured graph on every later run of it, whatever the inputs, so other shapes and
numpy calls use the Engine's ordinary session). ONNX Runtime captures in CUDA's
global mode, and keeps the captured graph per thread, so:

- every run of the graph session happens on one worker thread of the binder: the
  capture happens once, and calls from other threads replay it there;
- the capture (warm-up run plus capturing run) holds ``GATE`` exclusively: no
  IO-binding or numpy run of any Engine in this process runs meanwhile (they hold
  it shared). Work that is not an Engine's (torch in another thread) must not
  run on the GPU during the first call of a cuda_graph Engine.

A new target drops the capture (``reset``), and the next call captures again (a
capture is keyed by the target it bound, so a call holding the old target never
replays the new one's).

Reuse (the ordinary session): each (input shape, outputs, target) keeps up to
``SLOTS_PER_SHAPE`` slots, each one IOBinding with its output buffers bound once;
an input is bound again only when its pointer changes. The tensors a call returns
are aliases of its slot's buffers (``detach()``), and a slot is taken again only
once nothing outside it holds its storage any more (the caller dropped the results,
and every view, numpy array or autograd save of them): results handed out are never
overwritten by a later call. While they are held, the next call takes another slot,
or new buffers beyond the pool. A captured CUDA graph writes into fixed buffers, so
its replays return clones.

Host synchronizations of a distance call on ONNX Runtime's own stream: one before the
run (torch's stream, so the inputs are written) and ONNX Runtime's own at its end.
``total`` is bound to pinned host memory: ONNX Runtime copies it there inside the run,
so the NaN/Inf check reads it on the host with no copy or synchronization of its own
(``Outputs.host_total``), and the CUDA ``total`` the caller gets is filled from it
asynchronously. On torch's stream (``share_torch_stream``) the run itself synchronizes
nothing; ``total`` stays on the device and the check copies it (one wait).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Any, Iterator, Mapping

import numpy as np

from .. import layers as _layers
from ..errors import InputError


# ONNX Runtime's CUDA EP runs a graph session normally once (its allocations),
# captures on the next run and replays the capture to produce that run's outputs
# (cuda_execution_provider.cc: min_num_runs_before_cuda_graph_capture_ = 1).
CAPTURE_RUNS = 2

# Slots (bindings with their output buffers) kept per input shape, and shapes kept.
SLOTS_PER_SHAPE = 2
SHAPES_KEPT = 2


def _use_count(t: Any) -> int | None:
    """How many tensors share ``t``'s storage (torch's own count; None where this torch
    does not expose it: then no buffer is ever reused)."""
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(t.untyped_storage()._cdata))


class Outputs(dict):
    """A call's outputs by name; ``host_total`` holds the ``total`` ONNX Runtime already
    copied to the host (numpy), for the NaN/Inf check (finite.py), or None."""

    host_total: Any = None


class Slot:
    """One IOBinding with its output buffers (bound once) and the inputs' pointers."""

    def __init__(self, binding: Any, outs: dict[str, Any], host_total: Any) -> None:
        self.binding, self.outs, self.host_total = binding, outs, host_total
        self.bound: dict[str, tuple[int, tuple[int, ...]]] = {}  # input name: (pointer, shape)
        self.busy = False
        self.copied: Any = None  # CUDA event after the last host -> device copy of total
        self.extra: dict[str, Any] = {}  # the cached target's OrtValues it binds (see _slot)
        # What the use count of an unshared buffer reads (the pool's own reference).
        self.free_counts = {k: _use_count(t) for k, t in outs.items()}

    def free(self) -> bool:
        """Nothing outside the slot holds any of its buffers (results, views, numpy, autograd)."""
        if self.busy:
            return False
        counts = {k: _use_count(t) for k, t in self.outs.items()}
        return None not in counts.values() and counts == self.free_counts


class Gate:
    """Shared/exclusive lock: ordinary GPU runs share it, a capture holds it alone.

    A waiting capture blocks new shared holders, so a stream of calls cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    @property
    def held_exclusive(self) -> bool:
        return self._exclusive


GATE = Gate()  # one per process: CUDA's global capture mode is process-wide


def output_shapes(engine: Any, n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every output for an (n, 3, h, w) input, from the layer table."""
    shapes: dict[str, tuple[int, ...]] = {}
    arch = engine.spec.arch
    for name in engine.output_names:
        if engine.info.graph == "features":
            info = _layers.resolve(arch, name)
            shapes[name] = (n, info.channels, info.size(h), info.size(w))
        elif name == "grad.x":
            shapes[name] = (n, 3, h, w)
        elif name == "spatial":  # an LPIPS graph's per-pixel map
            shapes[name] = (n, 1, h, w)
        elif name.startswith("feature."):
            info = _layers.resolve(arch, name[len("feature."):])
            shapes[name] = (n, info.channels, info.size(h), info.size(w))
        elif name.startswith("gram."):
            c = _layers.resolve(arch, name[len("gram."):]).channels
            shapes[name] = (n, c, c)
        else:
            shapes[name] = (n,)
    return shapes


def _run_options(no_sync: bool) -> Any:
    import onnxruntime as ort

    ro = ort.RunOptions()
    if no_sync:
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return ro


class TorchBinder:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.session = engine.session
        self.device_id = engine.options.device_id
        self.graph = engine.options.cuda_graph
        self.stream = engine.options.user_stream  # the stream the main session runs on, if shared
        self._graph_lock = threading.Lock()
        self._static: dict[str, Any] | None = None  # the captured shape's session and buffers
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._no_sync = None  # RunOptions without the end-of-run host sync, made once
        self._slots: dict[tuple, list[Slot]] = {}  # by (shape, names, target), most recent last
        self._slots_lock = threading.Lock()

    @staticmethod
    def accepts(feeds: dict[str, Any]) -> bool:
        return all(getattr(getattr(v, "device", None), "type", None) == "cuda" for v in feeds.values())

    def _bind(self, binding, feeds: dict[str, Any], outs: dict[str, Any], extra: Mapping[str, Any]) -> None:
        for name, value in extra.items():  # OrtValues already on the device (cached targets)
            binding.bind_ortvalue_input(name, value)
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())
        for name, t in outs.items():
            binding.bind_output(name, "cuda", t.device.index or 0, self._np_out, tuple(t.shape), t.data_ptr())

    @property
    def _np_out(self) -> Any:
        """The outputs' numpy dtype: float32, or float16 for a --fp16-outputs features graph."""
        return np.float16 if getattr(self.engine.info, "output_dtype", None) == "float16" else np.float32

    def _alloc(self, like, names: tuple[str, ...]) -> dict[str, Any]:
        import torch

        n, _, h, w = like.shape
        shapes = output_shapes(self.engine, n, h, w)
        dtype = torch.float16 if self._np_out is np.float16 else torch.float32
        return {k: torch.empty(shapes[k], device=like.device, dtype=dtype) for k in names}

    def _slot(self, feeds: dict[str, Any], extra: Mapping[str, Any], names: tuple[str, ...],
              shared: bool) -> Slot:
        """A free slot for this call's shape (marked busy), or a new one. ``shared``: the run
        is on torch's stream, where nothing waits for it, so total stays on the device."""
        import torch

        # The caller's stream is part of the key: a slot freed by its caller may still be read
        # by work queued on that caller's stream, which only a run on that stream (after its
        # synchronization, or in its order) is sure to follow, as torch's allocator does.
        stream = int(torch.cuda.current_stream(feeds["x"].device).cuda_stream)
        key = (tuple(feeds["x"].shape), names, tuple(id(v) for v in extra.values()), shared, stream)
        with self._slots_lock:
            slots = self._slots.pop(key, [])
            self._slots[key] = slots  # most recently used last
            while len(self._slots) > SHAPES_KEPT:
                self._slots.pop(next(iter(self._slots)))
            for slot in slots:
                if slot.free():
                    slot.busy = True
                    return slot
        outs = self._alloc(feeds["x"], names)
        host_total = None
        if "total" in outs and not shared:  # ORT copies it to the host within the run (finite check)
            host_total = torch.empty(outs["total"].shape, dtype=torch.float32,
                                     pin_memory=torch.cuda.is_available())
        binding = self.session.io_binding()
        for name, value in extra.items():  # OrtValues already on the device (cached targets)
            binding.bind_ortvalue_input(name, value)
        for name, t in outs.items():
            if name == "total" and host_total is not None:
                binding.bind_output(name, "cpu", 0, np.float32, tuple(host_total.shape), host_total.data_ptr())
            else:
                binding.bind_output(name, "cuda", t.device.index or 0, self._np_out, tuple(t.shape), t.data_ptr())
        slot = Slot(binding, outs, host_total)
        slot.extra = dict(extra)  # held, so the ids in the key cannot be reused by a new target's
        slot.busy = True
        with self._slots_lock:
            slots = self._slots.get(key)
            if slots is not None and len(slots) < SLOTS_PER_SHAPE:
                slots.append(slot)
        return slot

    @staticmethod
    def _bind_inputs(slot: Slot, feeds: dict[str, Any]) -> None:
        for name, t in feeds.items():
            where = (t.data_ptr(), tuple(t.shape))
            if slot.bound.get(name) != where:
                slot.binding.bind_input(name, "cuda", t.device.index or 0, np.float32, where[1], where[0])
                slot.bound[name] = where

    def _check_device(self, feeds: dict[str, Any]) -> None:
        for name, t in feeds.items():
            if (t.device.index or 0) != self.device_id:
                raise InputError(
                    f"{name} is on {t.device}, but this Engine runs on cuda:{self.device_id}; accepted: "
                    f"tensors on cuda:{self.device_id}. Move them (t.to('cuda:{self.device_id}')) or "
                    f"create the Engine with ProviderOptions(device_id={t.device.index or 0}).")

    def reset(self) -> None:
        """Forget the captured graph (its session and buffers) and the slots, which bound the
        old target; the next call captures again."""
        with self._graph_lock:
            self._static = None
        with self._slots_lock:
            self._slots.clear()

    def _on_shared_stream(self, device: Any) -> bool:
        """Whether the caller's current torch stream is the one the session runs on."""
        import torch

        return self.stream is not None and int(torch.cuda.current_stream(device).cuda_stream) == self.stream

    def run(self, feeds: dict[str, Any], extra: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        import torch

        self._check_device(feeds)
        feeds = {k: v.contiguous() for k, v in feeds.items()}  # NCHW dense, whatever the layout
        if self.graph:
            # The target's OrtValues are part of the key: a capture binds them, and
            # the capture holds them, so their ids cannot be reused while it lives.
            key = (tuple(feeds["x"].shape), names, tuple(id(v) for v in extra.values()))
            with self._graph_lock:  # the key is read and the buffers used under one lock
                if self._static is None:
                    self._static = self._capture(feeds, extra, names, key)
                    return {k: v.clone() for k, v in self._static["out"].items()}
                if self._static["key"] == key:
                    return self._replay(self._static, feeds)
        device = feeds["x"].device
        shared = self._on_shared_stream(device)
        slot = self._slot(feeds, extra, names, shared)
        try:
            self._bind_inputs(slot, feeds)
            with GATE.shared():
                if shared:
                    # Same stream: ordered with torch's work on the device; no host wait.
                    if self._no_sync is None:
                        self._no_sync = _run_options(True)
                    self.session.run_with_iobinding(slot.binding, self._no_sync)
                else:
                    torch.cuda.current_stream(device).synchronize()  # inputs written before ORT reads
                    self.session.run_with_iobinding(slot.binding)  # ends with ORT's stream synchronized
            out = Outputs((k, v.detach()) for k, v in slot.outs.items())  # aliases: see free()
            if slot.host_total is not None:  # ORT's stream, synchronized at the end of its run
                out.host_total = slot.host_total.numpy().copy()
                # Pinned host -> device without a host wait; ordered before the next run by the
                # synchronization before it, and after the slot's previous copy even when that
                # was queued on another thread's stream.
                total = slot.outs["total"]
                if total.is_cuda:
                    stream = torch.cuda.current_stream(device)
                    if slot.copied is not None:
                        stream.wait_event(slot.copied)
                    total.copy_(slot.host_total, non_blocking=True)
                    slot.copied = torch.cuda.Event()
                    slot.copied.record(stream)
                else:
                    total.copy_(slot.host_total)
            return out
        finally:
            slot.busy = False

    def _on_worker(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the binder's graph thread (ORT keeps captured graphs per thread)."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pe-cuda-graph")
        return self._worker.submit(fn, *args).result()

    def _capture(self, feeds: dict[str, Any], extra: Mapping[str, Any], names: tuple[str, ...],
                 key: tuple) -> dict[str, Any]:
        """Open the graph session, bind fixed buffers, copy ``feeds`` in and run until
        ONNX Runtime has captured (its outputs are then this call's)."""
        import torch

        session = self.engine._open_graph_session()
        ins = {k: torch.empty_like(v) for k, v in feeds.items()}
        outs = self._alloc(feeds["x"], names)
        for k, v in feeds.items():
            ins[k].copy_(v)
        torch.cuda.current_stream(feeds["x"].device).synchronize()
        binding = session.io_binding()
        self._bind(binding, ins, outs, extra)

        def capture() -> None:
            with GATE.exclusive():
                torch.cuda.synchronize(feeds["x"].device)  # nothing of torch's in flight
                for _ in range(CAPTURE_RUNS):
                    session.run_with_iobinding(binding)

        self._on_worker(capture)
        return {"key": key, "session": session, "binding": binding, "in": ins, "out": outs,
                "extra": dict(extra)}

    def _replay(self, st: dict[str, Any], feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        for k, v in feeds.items():
            st["in"][k].copy_(v)
        torch.cuda.current_stream(feeds["x"].device).synchronize()  # the graph runs on ORT's stream

        def replay() -> None:
            with GATE.shared():
                st["session"].run_with_iobinding(st["binding"])

        self._on_worker(replay)
        # Clones: the fixed buffers are overwritten by the next call.
        return {k: v.clone() for k, v in st["out"].items()}

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None
