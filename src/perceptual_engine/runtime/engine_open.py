"""Opening an Engine: the model file checked and its metadata read (``read_info``), the
names its graph must have, the precision an ONNX Runtime device takes, the OpenVINO
backend, and what the memory estimate of its calls needs besides their shape."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, InputError, ModelError
from ..export.integrity import read_model
from ..export.metadata import ModelInfo
from . import providers as P


def check_model_file(path: str) -> None:
    """ModelError unless ``path`` is a regular file, saying what it is instead."""
    if not os.path.isfile(path):
        what = ("a folder" if os.path.isdir(path) else
                "not a regular file (a device, pipe or socket)" if os.path.exists(path)
                else "missing")
        raise ModelError(f"model {path!r} is {what}; give the path of an exported .onnx file "
                         "(perceptual-engine export -o model.onnx).")


def read_info(path: str) -> ModelInfo:
    """The ModelInfo in ``path``'s metadata (the file is parsed, not run), validated
    against the schema and checked against the digests recorded at export."""
    return read_model(path)


def check_names(path: str, info: ModelInfo, inputs: tuple[str, ...], got: tuple[str, ...],
                ins: tuple[str, ...]) -> None:
    """ModelError unless the graph's inputs ``ins`` and outputs ``got`` are the metadata's."""
    if got != info.output_names or ins != inputs:
        raise ModelError(
            f"{path!r} has inputs {ins} and outputs {got}, but its metadata promises "
            f"{inputs} and {info.output_names}; the file was edited or damaged. "
            "Re-export it."
        )


def memory_args(engine: Any) -> dict[str, Any]:
    """What the memory estimate needs besides the shape, fixed per model."""
    info = engine.info
    return dict(
        dtype=info.dtype, grad=bool(getattr(info, "grad", False)), arena=engine.cpu_arena,
        device="cuda" if engine.on_gpu else "cpu", **_gpu_terms(engine),
        taps=None if info.graph == "features" or info.loss is None
        else tuple(dict.fromkeys((*info.loss.content, *info.loss.style))),
        grams=tuple(info.loss.style) if info.loss is not None else ())


def check_static_shape(path: str, want: tuple[int, int, int], x: Any, name: str = "x") -> None:
    """A static-shape model runs one input shape: any other is an InputError naming both."""
    n, h, w = _nhw(x)
    if (n, h, w) != tuple(want):
        raise InputError(f"{name} has shape ({n}, 3, {h}, {w}), but {os.path.basename(path)} was exported for "
                         f"({want[0]}, 3, {want[1]}, {want[2]}) only (static_shape); pass that shape, or "
                         "export the model without static_shape.")


def _nhw(x: Any) -> tuple[int, int, int]:
    """(N, H, W) of a call's images (N, 3, H, W): the shape the estimate takes."""
    shape = tuple(x.shape)
    return int(shape[0]), int(shape[2]), int(shape[3])


def _gpu_terms(engine: Any) -> dict[str, Any]:
    """What the memory estimate adds on a GPU: cuDNN's workspace bound and the CUDA
    graph's second session (its own arena holds a second copy of the activations)."""
    if not engine.on_gpu:
        return {}
    o = engine.options
    return {"workspace": P.workspace_bytes(o), "sessions": 2 if o.cuda_graph else 1}


def _check_ort_precision(device: str, precision: str) -> None:
    if precision not in ("auto", "f32", "bf16"):
        raise ConfigError(f"precision={precision!r} is not accepted; accepted: auto, f32, bf16.")
    if precision == "bf16":
        raise ConfigError(f"precision='bf16' runs on device='openvino' only; device={device!r} runs "
                          "ONNX Runtime in float32. Use device='openvino', or precision='f32'.")


def _openvino_backend(path: str, info: ModelInfo, precision: str, threads: int | None,
                      check_names: Any) -> Any:
    """An OpenVINO backend whose inputs/outputs are the metadata's and whose numbers were
    checked against ONNX Runtime fp32."""
    from .backends import accuracy
    from .backends.openvino import OpenVinoBackend

    from ..errors import PrecisionError

    backend = OpenVinoBackend(path, precision, grad=bool(getattr(info, "grad", False)), threads=threads)
    check_names(backend.output_names, backend.input_names)
    backend.precision_note = ""
    try:
        backend.accuracy = accuracy.verify(path, info, backend.precision, backend.version, backend.run,
                                           backend.calibrate)
    except PrecisionError as exc:
        if precision != "auto" or backend.precision == "f32":
            raise
        # "auto" picks what passes: f32 where bf16 is outside its tier on this model.
        worst = sorted(exc.errors.items(), key=lambda kv: -kv[1])[:2]
        note = (f"precision auto runs f32 on {os.path.basename(path)}: bf16 is outside its accuracy "
                f"tier there ({', '.join(f'{n} {e:.2g}' for n, e in worst)})")
        backend = OpenVinoBackend(path, "f32", grad=bool(getattr(info, "grad", False)), threads=threads)
        check_names(backend.output_names, backend.input_names)
        backend.accuracy = accuracy.verify(path, info, "f32", backend.version, backend.run, backend.calibrate)
        backend.precision_note = note
    return backend
