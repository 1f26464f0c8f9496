"""The variants the benchmark compares: how each is built, called and synchronized.

A variant says whether it can run here (``unavailable`` returns the reason when it
cannot) and makes a ``Runner`` for one Case. The harness times
``runner.build()`` plus the first ``runner.call(0)`` as the cold start, then the
hot calls. Every runner takes the same input sets.

On the gradient workloads (train, stylize-step) the PyTorch variants are autograd
(bench/training.py): the baseline is the usual snippet (one pass over cat([x, y])),
the others keep y out of autograd; fp16/bf16 are AMP (autocast, float32 weights,
channels_last); torch-compile compiles the forward, autograd differentiates it.

Precision tiers decide the tolerance of the parity check: "fp32" 1e-4,
"tf32" 1e-2, "fp16" 1e-2, "bf16" 1e-1 (max relative error against the float32
PyTorch reference, TF32 off, on the same inputs, over every output: bf16 keeps 8
mantissa bits, and single style terms, whose Grams run in bf16, were measured up to
6e-2 off; the Engine's own bf16 tier for taps and total is tighter, docs/openvino.md).

CPU peers at the bf16 limit: ``torch-bf16-autocast`` (float32 weights, channels_last,
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the call, Grams included, as a
user writes it) and ``openvino-f32``/``openvino-bf16`` (the Engine on device="openvino").

grad.x has its own rule (GRAD_TOLERANCE, GRAD_FORGIVE): it is discontinuous where
a max-pool window holds near-tied values or a ReLU input is near zero, and two
correct computations (even float32 autograd and the exact float64 answer) may
route those few gradients differently. So the GRAD_FORGIVE fraction (1%) of its
elements with the largest errors is left out (a reroute moves a sparse set of
entries; a wrong gradient is off everywhere), and the rest must be within
GRAD_TOLERANCE of the reference, scaled by its largest magnitude.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import ConfigError, DeviceError
from .workloads import Case, torch_call, torch_model

# tf32 1e-2: PyTorch's own default (cuDNN TF32 on) is 1.3e-3 to 4e-3 off the strict
# float32 answer on an H200 (VGG19 to relu4_4, 224², batch 8: eager and compile, the
# style Grams the worst), and ONNX Runtime's TF32 lands in the same place.
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 1e-1}
# grad.x: the gradient goes back through every layer, so its rounding is that of
# about twice the network (fp16 5e-2 as export's GRAD_TOLERANCE; bf16 has 3 fewer
# mantissa bits than fp16; TF32 rounds products like fp16, accumulating in fp32).
# tf32 5e-2 as fp16: eager PyTorch's default TF32 and ORT's TF32 gradients were both
# 1.8e-2 off on an H200 (stylize-step, 224²).
GRAD_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-2, "fp16": 5e-2, "bf16": 1e-1}
# 1% in every tier: torch.compile's float32 gradient (CPU, VGG19 to relu4_4, 224²)
# differs from the float64 answer on 0.30% of x's elements by more than 1e-4 of its
# scale and matches it to 5e-7 elsewhere (forward terms within 1e-5): a reroute
# (the forward's own rounding flips near-tied decisions), not a wrong gradient; a
# wrong gradient is off on most elements, and no fraction hides that.
GRAD_FORGIVE = {"fp32": 1e-2, "tf32": 1e-2, "fp16": 1e-2, "bf16": 1e-2}
BASELINE = "torch-eager-fp32"


@dataclass
class Context:
    """What the variants share within one run."""

    device: str  # where the torch variants run: "cpu" | "cuda"
    quick: bool
    gpu_reason: str  # why GPU variants cannot run ("" when a CUDA GPU is used)
    ort_providers: tuple[str, ...]
    model_path: Callable[[Case, str], str]  # (case, dtype) -> exported ONNX file
    weights: Callable[[Any], Any]  # spec -> Weights, loaded once
    cache_dir: str


def torch_tf32_on() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off in torch for the duration (the reference), restored afterwards."""
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Runner:
    """One variant on one Case. ``precision`` is the tier actually in effect."""

    precision = "fp32"
    runs_on = "cpu"
    memory_torch_cuda = False  # GPU memory from torch's allocator
    memory_smi = False  # GPU memory from nvidia-smi

    def build(self) -> None: ...

    def call(self, i: int) -> Any:
        raise NotImplementedError

    def sync(self) -> None:
        if self.runs_on == "cuda":
            import torch

            torch.cuda.synchronize()

    def close(self) -> None: ...


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    gpu: bool

    def unavailable(self, ctx: Context, case: Case) -> str | None:
        """Why this variant cannot run ``case`` here, or None if it can."""
        if self.gpu and ctx.device != "cuda":
            return ctx.gpu_reason
        return None

    def runner(self, ctx: Context, case: Case) -> Runner:
        raise NotImplementedError


# -- PyTorch -----------------------------------------------------------------

class TorchRunner(Runner):
    def __init__(self, ctx: Context, case: Case, mode: str) -> None:
        import torch

        self.case, self.ctx, self.mode = case, ctx, mode
        self.device = torch.device(ctx.device)
        self.runs_on = self.device.type
        self.memory_torch_cuda = self.runs_on == "cuda"
        self.dtype = {"fp16-cl": torch.float16, "bf16-cl": torch.bfloat16,
                      "bf16-autocast": torch.bfloat16}.get(mode)
        # autocast: float32 weights, bf16 math where autocast puts it (convs, matmuls)
        self.autocast = mode == "bf16-autocast"
        fmt = torch.channels_last if self.dtype is not None else torch.contiguous_format
        # Inputs stay float32 (the model casts after normalizing); staged on the
        # device before the clock starts, as a training loop has them.
        self.sets = [{k: torch.from_numpy(v).to(self.device).contiguous(memory_format=fmt)
                      for k, v in s.items()} for s in case.sets]
        if self.dtype is not None:
            self.precision = "fp16" if self.dtype == torch.float16 else "bf16"
        elif self.runs_on == "cuda" and torch_tf32_on():
            self.precision = "tf32"

    def build(self) -> None:
        import torch

        model = torch_model(self.case, self.ctx.weights(self.case.spec)).to(self.device)
        if self.case.workload.grad:
            self._build_grad(model)
            return
        if self.autocast:
            model = model.to(memory_format=torch.channels_last)
        elif self.dtype is not None:
            model = model.to(dtype=self.dtype, memory_format=torch.channels_last)
        if self.case.target is not None:
            with torch.inference_mode():
                model.set_style_target(torch.from_numpy(self.case.target).to(self.device))
        self.model = model
        self.fn: Callable[[dict[str, Any]], Any] = lambda feeds: torch_call(self.case, model, feeds)
        if self.mode == "compile":
            # A cold start compiles from scratch: Inductor's on-disk caches from an
            # earlier run would otherwise turn it into a cache load. Restored in close().
            self._cache_cfg = _cache_config()
            self._caches = self._cache_cfg.force_disable_caches
            self._cache_cfg.force_disable_caches = True
            self.fn = _compiled_core(self.case, model)

    def _build_grad(self, model: Any) -> None:
        """train / stylize-step: float32 weights (AMP autocasts the convolutions, with
        channels_last), targets cached once, the terms function compiled if asked."""
        import torch

        from . import training

        if self.dtype is not None:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        targets = (training.cached_targets(self.case, model, self.device)
                   if self.case.workload.name == "stylize-step" else None)
        terms = training.terms_fn(self.case, model, snippet=self.mode == "fp32", targets=targets)
        if self.mode == "compile":  # as in build(): close() restores the setting
            self._cache_cfg = _cache_config()
            self._caches = self._cache_cfg.force_disable_caches
            self._cache_cfg.force_disable_caches = True
            terms = torch.compile(terms, dynamic=False)
        self.fn = lambda feeds: training.value_and_grad(terms, feeds, amp=self.dtype)

    def call(self, i: int) -> Any:
        import torch

        if self.case.workload.grad:  # autograd: no inference mode
            return self.fn(self.sets[i])
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.autocast):
            return self.fn(self.sets[i])

    def close(self) -> None:
        if self.mode == "compile":
            import torch

            torch._dynamo.reset()  # drop the compiled graphs of this shape
            if hasattr(self, "_caches"):
                self._cache_cfg.force_disable_caches = self._caches


def _cache_config() -> Any:
    """The config holding ``force_disable_caches``: torch.compiler.config from torch 2.9,
    Inductor's own config before (torch 2.6 to 2.8)."""
    import torch

    cfg = getattr(torch.compiler, "config", None)
    if cfg is not None and hasattr(cfg, "force_disable_caches"):
        return cfg
    import torch._inductor.config as inductor_config

    return inductor_config


def _compiled_core(case: Case, model: Any) -> Any:
    """The reference's computation without input validation (its data-dependent
    checks would break torch.compile's graph): the same modules and losses.py formulas."""
    import torch

    from .. import losses

    name = case.workload.name

    class Core(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, feeds: dict[str, Any]) -> dict[str, Any]:
            if name in ("lpips", "dists", "metrics"):  # the peer package's module itself, compiled
                return self.model(feeds["x"], feeds["y"])
            if name == "features":
                return self.model.extract(feeds["x"])
            feats, loss = self.model.features, self.model.loss
            if name == "style":
                return losses.distance_terms(feats.extract(feeds["x"]), None, loss,
                                             style_target=self.model._style_target)
            return losses.distance_terms(*feats.extract_pair(feeds["x"], feeds["y"]), loss)

    return torch.compile(Core(), dynamic=False)


@dataclass(frozen=True)
class TorchVariant(Variant):
    # "fp32" | "fp16-cl" | "bf16-cl" | "compile" | "nograd-y" (train: y outside autograd)
    mode: str = "fp32"

    def unavailable(self, ctx: Context, case: Case) -> str | None:
        why = super().unavailable(ctx, case)
        if why:
            return why
        if self.mode == "nograd-y" and case.workload.name != "train":
            return "train workload only (the others have no y in autograd)"
        if self.mode == "compile":
            if ctx.quick:
                return ("skipped in --quick: torch.compile spends tens of seconds to minutes "
                        "compiling each shape; run without --quick")
            if ctx.device == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
                return "no C++ compiler on PATH for torch.compile's CPU code (Inductor)"
        return None

    def runner(self, ctx: Context, case: Case) -> Runner:
        return TorchRunner(ctx, case, self.mode)


# -- ONNX Runtime --------------------------------------------------------------

class OrtRunner(Runner):
    def __init__(self, ctx: Context, case: Case, v: "OrtVariant") -> None:
        self.case, self.ctx, self.v = case, ctx, v
        self.runs_on = "cpu" if v.ep in ("cpu", "openvino") else "cuda"
        self.memory_smi = self.runs_on == "cuda"
        self.precision = {"float16": "fp16"}.get(v.dtype, "tf32" if v.tf32 else "fp32")
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
            fixed_shapes=True, tf32=self.v.tf32, cuda_graph=self.v.cuda_graph,
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
    tf32: bool = False
    feed: str = "numpy"  # "numpy" (host arrays) | "torch-cuda" (IO binding)
    cuda_graph: bool = False
    nhwc: bool = False  # ProviderOptions.prefer_nhwc (the CUDA provider's layout; NCHW by default)
    precision: str = "f32"  # device "openvino": "f32" | "bf16"

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


REGISTRY: dict[str, Variant] = {v.name: v for v in (
    TorchVariant("torch-eager-fp32", "PyTorch reference, eager, float32 (the usual snippet)", False),
    TorchVariant("torch-fp16-cl", "PyTorch eager, float16 weights, channels_last", True, "fp16-cl"),
    TorchVariant("torch-bf16-cl", "PyTorch eager, bfloat16 weights, channels_last", True, "bf16-cl"),
    TorchVariant("torch-compile", "torch.compile of the reference (default mode, static shapes)",
                 False, "compile"),
    TorchVariant("torch-nograd-y", "PyTorch eager float32, y under no_grad (train only)", False,
                 "nograd-y"),
    TorchVariant("torch-bf16-autocast", "PyTorch eager, float32 weights, channels_last, "
                 "torch.autocast bfloat16 (Grams too)", False, "bf16-autocast"),
    OrtVariant("ort-cpu", "ONNX Runtime, CPU execution provider", False, "cpu"),
    OrtVariant("openvino-f32", "the Engine on OpenVINO CPU, f32", False, "openvino"),
    OrtVariant("openvino-bf16", "the Engine on OpenVINO CPU, bf16 (INFERENCE_PRECISION_HINT)",
               False, "openvino", precision="bf16"),
    OrtVariant("ort-cuda-fp32", "ONNX Runtime CUDA, float32, TF32 off, numpy in/out", True, "cuda"),
    OrtVariant("ort-cuda-tf32", "ONNX Runtime CUDA, float32 with TF32, numpy in/out", True, "cuda",
               tf32=True),
    OrtVariant("ort-cuda-fp16", "ONNX Runtime CUDA, model exported as float16", True, "cuda",
               dtype="float16"),
    OrtVariant("ort-cuda-iobinding", "ONNX Runtime CUDA, float32, CUDA torch tensors via IO binding",
               True, "cuda", feed="torch-cuda"),
    OrtVariant("ort-cuda-graph", "ONNX Runtime CUDA, float32, IO binding + CUDA graph", True, "cuda",
               feed="torch-cuda", cuda_graph=True),
    # PyTorch's eager default runs its convolutions in TF32: this is the like-for-like row.
    OrtVariant("ort-cuda-tf32-iobinding", "ONNX Runtime CUDA, float32 with TF32, IO binding", True,
               "cuda", tf32=True, feed="torch-cuda"),
    OrtVariant("ort-cuda-fp16-iobinding", "ONNX Runtime CUDA, float16 model, IO binding", True,
               "cuda", dtype="float16", feed="torch-cuda"),
    OrtVariant("ort-cuda-fp16-nhwc", "as ort-cuda-fp16-iobinding with prefer_nhwc on (NHWC)",
               True, "cuda", dtype="float16", feed="torch-cuda", nhwc=True),
    OrtVariant("ort-cuda-fp16-graph", "ONNX Runtime CUDA, float16 model, IO binding + CUDA graph",
               True, "cuda", dtype="float16", feed="torch-cuda", cuda_graph=True),
    OrtVariant("ort-tensorrt", "ONNX Runtime TensorRT EP (TensorRT's default fp32/TF32)", True,
               "tensorrt", tf32=True),
)}


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


def resolve(names: tuple[str, ...]) -> list[Variant]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; accepted: {', '.join(REGISTRY)}.")
    return [REGISTRY[n] for n in names]


def resolve_device(requested: str) -> tuple[str, str]:
    """(device for torch/GPU variants, reason GPU variants cannot run or "")."""
    import torch

    from ..runtime.providers import cuda_gpu_count

    has_cuda = torch.cuda.is_available()
    why = "" if has_cuda else (cuda_gpu_count()[1] or "torch.cuda.is_available() is False")
    if requested == "cuda" and not has_cuda:
        raise DeviceError(f"--device cuda was requested but there is no CUDA GPU: {why}. "
                          "Use --device cpu or auto.")
    if requested == "cpu":
        return "cpu", "not run: --device cpu" if has_cuda else f"no CUDA GPU: {why}"
    return ("cuda", "") if has_cuda else ("cpu", f"no CUDA GPU: {why}")
