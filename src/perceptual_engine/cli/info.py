"""The environment report of ``perceptual-engine info``: versions, GPU, providers that load.

An execution provider that the onnxruntime build lists is not necessarily usable:
each one is tried by building a tiny session with ONNX Runtime's fallback off and
checking ``get_providers()``. GPU providers are not tried on a machine whose driver
reports no GPU (that attempt only makes ONNX Runtime print errors); the driver's
reason is reported instead.
"""
from __future__ import annotations

import importlib
import platform
from importlib import metadata
from typing import Any

from ..errors import first_line
from ..runtime import providers as P

GPU_PROVIDERS = (P.PROVIDER["cuda"], P.PROVIDER["tensorrt"])


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception as exc:  # reported, not hidden: a broken install is what info is for
        return f"not importable ({first_line(exc, 120)})"


def _ort_version() -> str:
    version = _version("onnxruntime")
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            metadata.version(dist)
            return f"{version} ({dist})"
        except metadata.PackageNotFoundError:
            continue
    return version


def _tiny_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def probe_provider(name: str) -> tuple[bool, str]:
    """(loads, reason when it does not) for one execution provider."""
    import onnxruntime as ort

    if name in GPU_PROVIDERS:
        gpus, why = P.cuda_gpu_count()
        if gpus == 0:
            return False, why
        if name == P.PROVIDER["tensorrt"]:
            ok, why = P.tensorrt_loadable()
            if not ok:
                return False, why
        P.preload_cuda()  # its messages go to stderr; the session attempt below reports what is missing
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(_tiny_model(), so, providers=[name], enable_fallback=0)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        missing = P.missing_cuda_libraries() if name in GPU_PROVIDERS else []
        if missing:
            reason += f"; missing libraries: {', '.join(missing)}"
        return False, reason
    got = sess.get_providers()
    if name not in got:
        return False, f"the session was created without it (got {got})"
    return True, ""


def collect() -> dict[str, Any]:
    """Everything ``info`` reports, as plain data."""
    from .. import __version__

    info: dict[str, Any] = {
        "perceptual_engine": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "onnx": _version("onnx"),
        "onnxruntime": _ort_version(),
        "numpy": _version("numpy"),
        "pillow": _version("PIL"),
    }
    gpus, why = P.cuda_gpu_count()
    info["cuda_driver_gpus"] = gpus
    info["cuda_driver_reason"] = why or None
    cuda: dict[str, Any] = {"torch_build": None, "available": False, "cudnn": None, "gpus": []}
    try:
        import torch

        cuda["torch_build"] = torch.version.cuda
        if torch.cuda.is_available():
            cuda["available"] = True
            cuda["cudnn"] = torch.backends.cudnn.version()
            cuda["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    info["cuda"] = cuda
    rows = []
    try:
        available = P.available_providers()
    except Exception as exc:
        available = []
        info["providers_error"] = f"{type(exc).__name__}: {exc}"
    for name in available:
        ok, reason = probe_provider(name)
        rows.append({"name": name, "loads": ok, "reason": reason or None})
    info["providers"] = rows
    usable = [r["name"] for r in rows if r["loads"]]
    auto = [n for n in (P.PROVIDER["tensorrt"], P.PROVIDER["cuda"]) if n in usable]
    info["auto_device_uses"] = (auto[:1] or ["CPUExecutionProvider"])[0]
    info["openvino"] = probe_openvino()
    info["cache_dir"] = P.default_cache_dir()
    return info


def probe_openvino() -> dict[str, Any]:
    """device="openvino": installed?, its version, the CPU's OPTIMIZATION_CAPABILITIES and
    the precision "auto" picks for forward graphs (docs/openvino.md)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return {"installed": False, "reason": "not installed (pip install 'perceptual-engine[openvino]')"}
    try:
        from ..runtime.backends.openvino import capabilities, import_openvino, resolve_precision

        ov = import_openvino()
        caps = capabilities(ov.Core())
        prec = resolve_precision("auto", caps, grad=False)
        return {"installed": True, "version": ov.get_version(), "capabilities": caps,
                "runs": f"OpenVINO CPU {prec}", "auto_precision": prec}
    except Exception as exc:  # reported, not hidden: a broken install is what info is for
        return {"installed": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def format_text(info: dict[str, Any]) -> str:
    cuda = info["cuda"]
    lines = [f"perceptual-engine {info['perceptual_engine']}",
             f"  python        {info['python']} ({info['platform']})"]
    for key in ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "pillow"):
        lines.append(f"  {key:<13} {info[key]}")
    if cuda["available"]:
        lines.append(f"  CUDA          {cuda['torch_build']} (torch build), cuDNN {cuda['cudnn']}")
        for i, name in enumerate(cuda["gpus"]):
            lines.append(f"  GPU {i}         {name}")
    else:
        build = f"torch built for CUDA {cuda['torch_build']}" if cuda["torch_build"] else "CPU-only torch"
        reason = info["cuda_driver_reason"] or "torch.cuda.is_available() is False"
        lines.append(f"  CUDA          not available ({build}; {reason})")
        lines.append("  GPU           none")
    lines.append("execution providers (listed by this onnxruntime build -> loads here?):")
    for row in info["providers"]:
        state = "yes" if row["loads"] else f"no: {row['reason']}"
        lines.append(f"  {row['name']:<27} {state}")
    if "providers_error" in info:
        lines.append(f"  onnxruntime failed: {info['providers_error']}")
    lines.append(f"device 'auto' runs on: {info['auto_device_uses']}")
    ov = info.get("openvino", {})
    if ov.get("installed"):
        lines.append(f"device 'openvino' runs: {ov['runs']} (precision auto; gradients f32), "
                     f"OpenVINO {ov['version']}, OPTIMIZATION_CAPABILITIES {' '.join(ov['capabilities'])}")
    else:
        lines.append(f"device 'openvino': {ov.get('reason', 'unknown')}")
    lines.append(f"cache folder:  {info['cache_dir']}")
    return "\n".join(lines)

