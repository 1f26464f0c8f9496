"""The Engine's variants: ONNX Runtime on CPU, CUDA (float32, TF32, float16; numpy in
and out, IO binding, CUDA graphs, NHWC) and TensorRT, and OpenVINO on CPU (f32, bf16)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .variant_base import Context, Runner, Variant
from .workloads import Case


class OrtRunner(Runner):
    def __init__(self, ctx: Context, case: Case, v: "OrtVariant") -> None:
        self.case, self.ctx, self.v = case, ctx, v
        self.runs_on = "cpu" if v.ep in ("cpu", "openvino") else "cuda"
        self.memory_smi = self.runs_on == "cuda"
        self.precision = {"float16": "fp16"}.get(v.dtype, "tf32" if v.use_tf32 else "fp32")
        if v.precision == "bf16":
            self.precision = "bf16"
        self.path = ctx.model_path(case, v.dtype)  # exported here, before the clock starts
        if v.feed == "torch-cuda":
            import torch

            self.sets = [{k: torch.from_numpy(a).cuda() for k, a in s.items()} for s in case.sets]
        else:
            self.sets = case.sets

    def build(self) -> None:
        from ..runtime import Engine, ProviderOptions, ShapeRange

        b, s = self.case.batch, self.case.size
        opts = ProviderOptions(
            fixed_shapes=True, tf32=self.v.use_tf32, cuda_graph=self.v.cuda_graph,
            prefer_nhwc=self.v.nhwc,
            cache_dir=self.ctx.cache_dir,
            shapes=ShapeRange(min=(1, min(s, 32), min(s, 32)), opt=(b, s, s), max=(b, s, s)),
        )
        self.engine = Engine(self.path, self.v.ep, options=opts,
                             **({"precision": self.v.precision} if self.v.ep == "openvino" else {}))
        if self.case.workload.name == "stylize-step":
            self.engine.set_target(content=self.case.content_target,  # type: ignore[attr-defined]
                                   style=self.case.target)
        elif self.case.target is not None:
            self.engine.set_style_target(self.case.target)  # type: ignore[attr-defined]

    def call(self, i: int) -> Any:
        feeds = self.sets[i]
        if self.case.workload.name == "features":
            return self.engine.features(feeds["x"])
        if self.case.workload.name in ("style", "stylize-step"):
            return self.engine.distance(feeds["x"])  # type: ignore[call-arg]
        return self.engine.distance(feeds["x"], feeds["y"])

    def close(self) -> None:
        self.engine = None  # type: ignore[assignment]


@dataclass(frozen=True)
class OrtVariant(Variant):
    ep: str = "cpu"  # Engine device: "cpu" | "cuda" | "tensorrt" | "openvino"
    dtype: str = "float32"  # the exported model's dtype
    tf32: bool = False  # float32 models only: a float16 model always runs with use_tf32=1
    feed: str = "numpy"  # "numpy" (host arrays) | "torch-cuda" (IO binding)
    cuda_graph: bool = False
    nhwc: bool = False  # ProviderOptions.prefer_nhwc (the CUDA provider's layout; NCHW by default)
    precision: str = "f32"  # device "openvino": "f32" | "bf16"

    @property
    def use_tf32(self) -> bool:
        """ONNX Runtime's use_tf32 for this row. Always on for a float16 model: with
        use_tf32=0 the cuDNN-frontend convolutions (ORT 1.20+) run float16 without tensor
        cores (provider_options.for_model); the float16 rows of the first H200 run did."""
        return self.tf32 or self.dtype == "float16"

    @property
    def host_io(self) -> bool:
        """A GPU row fed numpy arrays: every call copies inputs and outputs over PCIe."""
        return self.gpu and self.feed == "numpy"

    def unavailable(self, ctx: Context, case: Case) -> str | None:
        from ..runtime import Engine
        from ..runtime.providers import PROVIDER, tensorrt_loadable

        if self.ep == "openvino":
            return openvino_unavailable(self.precision, case.workload.grad)
        reasons = []
        if self.gpu and ctx.device != "cuda":
            reasons.append(ctx.gpu_reason)
        provider = PROVIDER[self.ep]
        if provider not in ctx.ort_providers:
            reasons.append(f"this onnxruntime offers {list(ctx.ort_providers)}, not {provider}")
        if self.ep == "tensorrt":
            ok, why = tensorrt_loadable()
            if not ok:
                reasons.append(f"TensorRT not loadable: {why}")
        if case.workload.name == "style" and not hasattr(Engine, "set_style_target"):
            reasons.append("Engine.set_style_target not available")
        if case.workload.name == "stylize-step" and not hasattr(Engine, "set_target"):
            reasons.append("Engine.set_target not available")
        return "; ".join(reasons) or None

    def runner(self, ctx: Context, case: Case) -> Runner:
        return OrtRunner(ctx, case, self)


def openvino_unavailable(precision: str, grad: bool) -> str | None:
    """Why the OpenVINO variant cannot run here: no extra, no BF16, or bf16 gradients."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install 'perceptual-engine[openvino]')"
    if precision == "bf16":
        from ..runtime.backends.openvino import capabilities

        caps = capabilities(ov.Core())
        if "BF16" not in caps:
            return f"this CPU has no BF16 (OpenVINO capabilities {', '.join(caps)})"
        if grad:
            return "the Engine refuses OpenVINO bf16 gradient graphs (grad.x outside its tier)"
    return None
