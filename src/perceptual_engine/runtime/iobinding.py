"""Zero-copy CUDA torch tensors in and out of ONNX Runtime through IO binding.

Inputs are bound by pointer (made contiguous NCHW first: channels_last or strided
tensors would otherwise be misread); outputs are preallocated torch tensors that
ONNX Runtime writes into. torch's current stream is synchronized before the run,
so ORT never reads an input torch has not finished writing; run_with_iobinding
synchronizes ORT's stream before returning, so outputs are ready for torch.

With ``ProviderOptions(cuda_graph=True)`` the first (batch, height, width) seen is
captured as a CUDA graph over fixed buffers, in a session of its own (ONNX Runtime
replays a session's captured graph on every later run of it, whatever the inputs,
so other shapes and numpy calls use the Engine's ordinary session). A lock keeps
concurrent callers from overwriting the fixed buffers; a new target drops the
capture (``reset``), and the next call captures again (a capture is keyed by the
target it bound, so a call holding the old target never replays the new one's).
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from .. import layers as _layers
from ..errors import InputError


def output_shapes(engine: Any, n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every output for an (n, 3, h, w) input, from the layer table."""
    shapes: dict[str, tuple[int, ...]] = {}
    arch = engine.spec.arch
    for name in engine.output_names:
        if engine.info.graph == "features":
            info = _layers.resolve(arch, name)
            shapes[name] = (n, info.channels, h // info.downsample, w // info.downsample)
        elif name == "grad.x":
            shapes[name] = (n, 3, h, w)
        elif name == "spatial":  # an LPIPS graph's per-pixel map
            shapes[name] = (n, 1, h, w)
        elif name.startswith("feature."):
            info = _layers.resolve(arch, name[len("feature."):])
            shapes[name] = (n, info.channels, h // info.downsample, w // info.downsample)
        elif name.startswith("gram."):
            c = _layers.resolve(arch, name[len("gram."):]).channels
            shapes[name] = (n, c, c)
        else:
            shapes[name] = (n,)
    return shapes


class TorchBinder:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.session = engine.session
        self.device_id = engine.options.device_id
        self.graph = engine.options.cuda_graph
        self._graph_lock = threading.Lock()
        self._static: dict[str, Any] | None = None  # the captured shape's session and buffers

    @staticmethod
    def accepts(feeds: dict[str, Any]) -> bool:
        return all(getattr(getattr(v, "device", None), "type", None) == "cuda" for v in feeds.values())

    def _bind(self, binding, feeds: dict[str, Any], outs: dict[str, Any], extra: Mapping[str, Any]) -> None:
        for name, value in extra.items():  # OrtValues already on the device (cached targets)
            binding.bind_ortvalue_input(name, value)
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())
        for name, t in outs.items():
            binding.bind_output(name, "cuda", t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())

    def _alloc(self, like, names: tuple[str, ...]) -> dict[str, Any]:
        import torch

        n, _, h, w = like.shape
        shapes = output_shapes(self.engine, n, h, w)
        return {k: torch.empty(shapes[k], device=like.device, dtype=torch.float32) for k in names}

    def _check_device(self, feeds: dict[str, Any]) -> None:
        for name, t in feeds.items():
            if (t.device.index or 0) != self.device_id:
                raise InputError(
                    f"{name} is on {t.device}, but this Engine runs on cuda:{self.device_id}; accepted: "
                    f"tensors on cuda:{self.device_id}. Move them (t.to('cuda:{self.device_id}')) or "
                    f"create the Engine with ProviderOptions(device_id={t.device.index or 0}).")

    def reset(self) -> None:
        """Forget the captured graph (its session and buffers); the next call captures again."""
        with self._graph_lock:
            self._static = None

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
                if self._static["key"] == key:
                    return self._replay(self._static, feeds)
        outs = self._alloc(feeds["x"], names)
        binding = self.session.io_binding()
        self._bind(binding, feeds, outs, extra)
        torch.cuda.current_stream(feeds["x"].device).synchronize()
        self.session.run_with_iobinding(binding)
        return outs

    def _capture(self, feeds: dict[str, Any], extra: Mapping[str, Any], names: tuple[str, ...],
                 key: tuple) -> dict[str, Any]:
        import torch

        session = self.engine._open_graph_session()
        ins = {k: torch.empty_like(v) for k, v in feeds.items()}
        outs = self._alloc(feeds["x"], names)
        binding = session.io_binding()
        self._bind(binding, ins, outs, extra)
        return {"key": key, "session": session, "binding": binding, "in": ins, "out": outs,
                "extra": dict(extra)}

    @staticmethod
    def _replay(st: dict[str, Any], feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        for k, v in feeds.items():
            st["in"][k].copy_(v)
        torch.cuda.current_stream(feeds["x"].device).synchronize()
        st["session"].run_with_iobinding(st["binding"])
        # Clones: the fixed buffers are overwritten by the next call.
        return {k: v.clone() for k, v in st["out"].items()}
