"""OpenVINO on the CPU (device="openvino"): the same exported ONNX files, compiled with
INFERENCE_PRECISION_HINT f32 or bf16.

The ``openvino`` package is the ``[openvino]`` extra, imported only here. Precision:
"f32"; "bf16" (refused where the CPU does not report BF16 in OPTIMIZATION_CAPABILITIES);
"auto": bf16 where the CPU has it, except for gradient graphs, which get f32 (bf16 put
grad.x outside its tier, docs/openvino.md). The numbers are checked against ONNX
Runtime's fp32 once per model (accuracy.py) before the backend is handed out.

bf16 near small distances: the check calibrates ``near_total``; every sample whose bf16
``total`` is below it (near-duplicates, where bf16's rounding is as large as the distance)
is recomputed by an f32 compilation of the same model, made on first need.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ConfigError, DeviceError

PRECISIONS = ("auto", "f32", "bf16")
INSTALL = "pip install 'perceptual-engine[openvino]'"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise DeviceError(f"device='openvino' needs the openvino package, which is not installed; "
                          f"install it: {INSTALL}") from exc
    return openvino


def capabilities(core: Any) -> list[str]:
    """The CPU's OPTIMIZATION_CAPABILITIES as OpenVINO reports them (e.g. FP32, BF16, INT8)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def resolve_precision(precision: str, caps: Sequence[str], grad: bool) -> str:
    """f32 or bf16 for a requested precision on a CPU with ``caps``; ConfigError if refused."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not accepted; accepted: {', '.join(PRECISIONS)}.")
    if precision == "bf16" and "BF16" not in caps:
        raise ConfigError(f"precision='bf16' was requested, but this CPU's OpenVINO capabilities are "
                          f"{', '.join(caps)} (no BF16: it needs avx512_bf16 or AMX). Use "
                          "precision='f32' or precision='auto'.")
    if precision == "auto":
        return "bf16" if "BF16" in caps and not grad else "f32"
    return precision


def _op_named(core: Any, model: Any) -> str:
    """The ops the CPU plugin cannot take (query_model), for a compile error's message."""
    try:
        supported = core.query_model(model, "CPU")
    except Exception:
        return ""
    bad = [f"{op.get_friendly_name()} ({op.get_type_name()})" for op in model.get_ops()
           if op.get_friendly_name() not in supported]
    return f"; unsupported op(s): {', '.join(bad[:5])}" if bad else ""


class OpenVinoBackend:
    """A compiled OpenVINO CPU model; one infer request per thread (requests are not
    shared between threads, the compiled model is)."""

    on_gpu = False

    def __init__(self, path: str, precision: str = "auto", *, grad: bool = False,
                 threads: int | None = None) -> None:
        ov = import_openvino()
        self.version = ov.get_version()
        core = ov.Core()
        self.capabilities = capabilities(core)
        self.precision = resolve_precision(precision, self.capabilities, grad)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision,
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core, self._path, self._config = core, path, config
        self.near_total = 0.0  # bf16: totals below it are recomputed in f32 (set by the check)
        self.recomputed = 0  # samples recomputed in f32 so far
        self._f32: Any = None
        self._f32_lock = threading.Lock()
        try:
            model = core.read_model(path)
        except Exception as exc:
            raise DeviceError(f"OpenVINO could not read {path!r}: {str(exc).strip()[:400]}. "
                              "Use device='cpu' (ONNX Runtime) for this model.") from exc
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise DeviceError(f"OpenVINO could not compile {path!r} for the CPU ({self.precision})"
                              f"{_op_named(core, model)}: {str(exc).strip()[:400]}. Use device='cpu' "
                              "(ONNX Runtime) for this model.") from exc
        self._ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        # One name per port, the ONNX graph's (a port may carry aliases OpenVINO added).
        self.input_names = tuple(p.get_any_name() for p in self.compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self.compiled.outputs)
        self._local = threading.local()
        self.providers = [f"OpenVINO CPU {self.precision}"]

    def _request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def calibrate(self, near_total: float) -> None:
        """Recompute in f32 the samples whose bf16 ``total`` is below ``near_total``."""
        self.near_total = float(near_total)

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        near = self.near_total > 0 and "total" in self._ports
        want = list(names) + (["total"] if near and "total" not in names else [])
        out = self._infer(self._request(), self._ports, feeds, want)
        if near:
            small = np.nonzero(~(out["total"] >= self.near_total))[0]  # NaN too
            if small.size:
                self._recompute(feeds, out, small)
        return {name: out[name] for name in names}

    @staticmethod
    def _infer(req: Any, ports: Mapping[str, Any], feeds: Mapping[str, np.ndarray],
               names: Sequence[str]) -> dict[str, np.ndarray]:
        res = req.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        # Copies: the request's output buffers are overwritten by its next call.
        return {name: np.array(res[ports[name]], dtype=np.float32, copy=True) for name in names}

    def run_exact(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """``run`` in f32 whatever the precision: for cached targets (Grams, content features),
        which every later call is compared with."""
        if self.precision == "f32":
            return self.run(feeds, names)
        out = {}
        n = len(next(iter(feeds.values())))
        self._recompute(feeds, out, np.arange(n), names)
        return out

    def _recompute(self, feeds: Mapping[str, np.ndarray], out: dict[str, np.ndarray],
                   rows: np.ndarray, names: Sequence[str] | None = None) -> None:
        """Overwrite ``rows`` of every output in ``out`` (or set ``names``) with an f32 run of
        those samples (x and y are per sample; cached targets are fed whole)."""
        with self._f32_lock:
            if self._f32 is None:
                compiled = self._core.compile_model(self._core.read_model(self._path), "CPU",
                                                    {**self._config, "INFERENCE_PRECISION_HINT": "f32"})
                ports = {n: p for p in compiled.outputs for n in p.get_names()}
                self._f32 = (compiled, ports, threading.local())
        compiled, ports, local = self._f32
        req = getattr(local, "request", None)
        if req is None:
            req = local.request = compiled.create_infer_request()
        sub = {k: (v[rows] if k in ("x", "y") else v) for k, v in feeds.items()}
        exact = self._infer(req, ports, sub, list(out) if names is None else list(names))
        if names is not None:
            out.update(exact)
            return
        for name, values in exact.items():
            out[name][rows] = values
        self.recomputed += int(rows.size)

    def keep(self, array: np.ndarray) -> Any:
        return np.array(array, copy=True)  # host memory is the device's

    def run_cached(self, feeds: Mapping[str, np.ndarray], cached: Mapping[str, Any],
                   names: Sequence[str]) -> dict[str, np.ndarray]:
        return self.run({**feeds, **cached}, names)

    def describe(self) -> str:
        return (f"OpenVINO {self.version}, CPU {self.precision}, "
                f"OPTIMIZATION_CAPABILITIES {' '.join(self.capabilities)}")
