"""ONNX Runtime: sessions for cpu/cuda/tensorrt (providers.py plans them; IO binding and
CUDA graphs stay in iobinding.py), and the Backend that runs one."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import DeviceError, ModelError
from .. import providers as P


def session_options(threads: int | None, cpu_arena: bool, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = cpu_arena
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: a failed provider is reported by us, with the reason
    if threads:
        so.intra_op_num_threads = threads
    if not spin:  # worker threads sleep between parallel sections instead of busy-waiting
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def open_session(path: str, device: str, options: P.ProviderOptions, so: Any, dynamic: Sequence[str],
                 model_key: Callable[[], str]) -> tuple[Any, str]:
    """An InferenceSession for ``device``, and why "auto" did not get its first choice.

    ``dynamic``: the graph's dynamic inputs, which TensorRT's optimization profile covers.
    "auto" walks its chain (TensorRT, CUDA, CPU): a provider that fails to start
    is skipped with a RuntimeWarning and the next one tried, so a TensorRT failure
    lands on CUDA, not on the CPU. An explicit GPU device raises DeviceError.
    """
    import onnxruntime as ort

    from ..iobinding import GATE

    chain = P.plan(device, options, dynamic, model_key)
    gpu = any(name != "CPUExecutionProvider" for name, _ in chain)
    if gpu:
        preload_cuda()
    failures: list[str] = []
    for start in range(len(chain)):
        try:
            # A new session allocates on the GPU: not while a CUDA graph is captured.
            with GATE.shared() if gpu else contextlib.nullcontext():
                session = ort.InferenceSession(path, so, providers=chain[start:], enable_fallback=0)
        except Exception as exc:
            if device in ("cuda", "tensorrt"):
                raise DeviceError(why_not(device, exc)) from exc
            if device != "auto" or start == len(chain) - 1:
                raise ModelError(f"ONNX Runtime could not load {path!r}: {exc}") from exc
            failures.append(f"{chain[start][0]} failed: {_first(exc)}")
            warnings.warn(f"device='auto' skips {failures[-1]}; trying {chain[start + 1][0]}",
                          RuntimeWarning, stacklevel=4)
            continue
        return session, "; ".join(failures)
    raise AssertionError("unreachable: the last provider either returns or raises")


class OrtBackend:
    """Runs an ONNX Runtime session on host arrays; cached values are OrtValues on its device."""

    def __init__(self, session: Any, device_id: int = 0) -> None:
        self.session = session
        self.device_id = device_id
        self.providers: list[str] = list(session.get_providers())

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] != "CPUExecutionProvider"

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(zip(names, self.session.run(list(names), dict(feeds))))

    def keep(self, array: np.ndarray) -> Any:
        import onnxruntime as ort

        device, dev_id = ("cuda", self.device_id) if self.on_gpu else ("cpu", 0)
        return ort.OrtValue.ortvalue_from_numpy(array, device, dev_id)

    def run_cached(self, feeds: Mapping[str, np.ndarray], cached: Mapping[str, Any],
                   names: Sequence[str]) -> dict[str, np.ndarray]:
        if not cached:
            return self.run(feeds, names)
        import onnxruntime as ort

        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        values.update(cached)
        out = self.session.run_with_ort_values(list(names), values)
        return {k: v.numpy() for k, v in zip(names, out)}

    def describe(self) -> str:
        import onnxruntime as ort

        return f"ONNX Runtime {ort.__version__}, {', '.join(self.providers)}"


def preload_cuda() -> None:
    P.preload_cuda()  # its output goes to stderr: a command's stdout stays clean


def why_not(device: str, exc: BaseException | None, got: list[str] | None = None) -> str:
    parts = [f"device {device!r} was requested but ONNX Runtime could not start {P.PROVIDER[device]}"]
    if got is not None:
        parts.append(f"(the session got {got})")
    if exc is not None:
        parts.append(f"({_first(exc)})")
    missing = P.missing_cuda_libraries()
    if missing:
        wheels = P.cuda_wheels(missing)
        parts.append(f"; missing libraries: {', '.join(missing)} (pip install {' '.join(wheels)}, "
                     "or add their folder to LD_LIBRARY_PATH)")
    parts.append(". Use device='cpu' to run on the CPU deliberately.")
    return " ".join(parts)



def _first(exc: BaseException) -> str:
    """The first line of an exception's message; its type name when the message is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
