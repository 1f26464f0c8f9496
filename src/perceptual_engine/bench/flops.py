"""Work counts and the hardware ceiling: FLOPs per call and a measured peak.

FLOPs are multiply-adds × 2. A workload counts its convolutions (layers.conv_flops)
and its Gram products (2·C²·H·W per Gram); elementwise work is left out, so the
achieved rate is a slight underestimate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .. import layers as _layers


def gram_flops(arch: str, layer_names: Iterable[str], height: int, width: int) -> int:
    """FLOPs of one image's Grams F Fᵀ at ``layer_names`` (F: C × H_l·W_l)."""
    total = 0
    for name in layer_names:
        info = _layers.resolve(arch, name)
        h, w = height, width
        # Floor at every pool, as the network does.
        d = 1
        while d < info.downsample:
            h, w, d = h // 2, w // 2, d * 2
        total += 2 * info.channels * info.channels * h * w
    return total


@dataclass(frozen=True)
class Peak:
    """A measured matrix-product rate: the ceiling for one (device, precision)."""

    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "tf32" | "fp16" | "bf16"
    n: int  # square matrix side
    ms: float  # fastest of the timed products (a ceiling: the best the device did)
    tflops: float
    library: str = "torch.mm"

    def to_dict(self) -> dict[str, object]:
        return {"device": self.device, "precision": self.precision, "n": self.n,
                "ms": self.ms, "tflops": self.tflops, "library": self.library}


def _fastest_ms(fn: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times)


def measure_peak(device: str, precision: str, *, n: int | None = None, reps: int = 5) -> Peak:
    """Time an n×n @ n×n product (2n³ FLOPs) at ``precision`` on ``device``; fastest of ``reps``
    (a ceiling, so the best run counts; on a shared CPU a median would understate it).

    CPU "bf16": torch.mm on bfloat16 (oneDNN: avx512_bf16 or AMX where the CPU has them),
    the ceiling of the CPU's bf16 rows. CPU "fp32": n=2048, the fastest of torch.mm (MKL), numpy's matmul (OpenBLAS)
    and ONNX Runtime's MatMul (MLAS): their kernels differ by up to 2× on one CPU. CUDA: n=8192; "fp32" with TF32 off, "tf32" with it on,
    "fp16"/"bf16" on tensor cores. The TF32 switch is restored afterwards.
    """
    import numpy as np
    import torch

    n = n or (2048 if device == "cpu" else 8192)
    dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16}[precision]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    if device == "cpu" and precision == "bf16":  # oneDNN's bf16 GEMM (avx512_bf16, AMX)
        ms, lib = _fastest_ms(lambda: torch.mm(a, b), lambda: None, reps), "torch.mm bf16"
    elif device == "cpu":
        ms, lib = _fastest_ms(lambda: torch.mm(a, b), lambda: None, reps), "torch.mm"
        an, bn = a.numpy(), b.numpy()
        for name, fn in (("numpy.matmul", lambda: np.matmul(an, bn)),
                         ("onnxruntime MatMul", _ort_matmul(an, bn))):
            other = _fastest_ms(fn, lambda: None, reps)
            if other < ms:
                ms, lib = other, name
    else:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            ms, lib = _fastest_ms(lambda: torch.mm(a, b), torch.cuda.synchronize, reps), "torch.mm"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return Peak(device, precision, n, ms, 2 * n**3 / (ms / 1000) / 1e12, lib)


def _ort_matmul(a: Any, b: Any) -> Callable[[], object]:
    """A one-node ONNX MatMul session on ONNX Runtime's CPU provider, as a callable."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = a.shape[0]
    io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"a": a, "b": b})


def ceilings(variants: Sequence[Any], device: str, say: Callable[[str], None]) -> dict[str, Peak]:
    """The peaks the chosen variants are compared with: CPU fp32 where a variant runs
    on the CPU; on a CUDA device its fp32, tf32, fp16 and bf16 peaks. Keys "cpu-fp32"..."""
    wanted = []
    if any(not v.gpu for v in variants) and (device == "cpu" or any(
            getattr(v, "ep", None) == "cpu" for v in variants)):
        wanted.append(("cpu", "fp32"))
    if any(not v.gpu and "bf16" in v.name for v in variants):  # CPU bf16 rows: their own ceiling
        wanted.append(("cpu", "bf16"))
    if device == "cuda":
        wanted += [("cuda", p) for p in ("fp32", "tf32", "fp16", "bf16")]
    out = {}
    for dev, prec in wanted:
        say(f"measuring the {dev} {prec} matrix-product peak")
        out[f"{dev}-{prec}"] = measure_peak(dev, prec)
    return out
