"""The PyTorch variants: eager float32 (the reference), float16/bfloat16 weights with
channels_last, bfloat16 autocast, torch.compile (of the float32 reference and of the
float16 channels_last model), float16 channels_last with cuDNN autotuning
(``torch.backends.cudnn.benchmark``), and y outside autograd (train).

On the gradient workloads (train, stylize-step) they are autograd (bench/training.py):
the baseline is the usual snippet (one pass over cat([x, y])), the others keep y out
of autograd; fp16/bf16 are AMP (autocast, float32 weights, channels_last, the loss
terms in float32 outside autocast); torch-compile compiles the forward, autograd
differentiates it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable

from .tiers import torch_tf32_on
from .variant_base import Context, Runner, Variant
from .workloads import Case, torch_call, torch_model


class TorchRunner(Runner):
    def __init__(self, ctx: Context, case: Case, mode: str) -> None:
        import torch

        self.case, self.ctx, self.mode = case, ctx, mode
        self.device = torch.device(ctx.device)
        self.runs_on = self.device.type
        self.memory_torch_cuda = self.runs_on == "cuda"
        self.dtype = {"fp16-cl": torch.float16, "bf16-cl": torch.bfloat16, "bf16-autocast": torch.bfloat16,
                      "compile-fp16-cl": torch.float16, "fp16-cl-autotune": torch.float16}.get(mode)
        self.compiled = mode in ("compile", "compile-fp16-cl")
        # cuDNN times its algorithms per shape (torch.backends.cudnn.benchmark), on from
        # build() to close(): the autotuning ONNX Runtime no longer does (ORT 1.20+).
        self.autotune = mode == "fp16-cl-autotune"
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

        if self.autotune:
            self._benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
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
        if self.compiled:
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
        terms = training.terms_fn(self.case, model, snippet=self.mode == "fp32", targets=targets,
                                  amp=self.dtype)
        if self.compiled:  # as in build(): close() restores the setting
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
        if hasattr(self, "_benchmark"):
            import torch

            torch.backends.cudnn.benchmark = self._benchmark
        if self.compiled:
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
            if name in ("dists", "metrics") or case.workload.net:  # the peer package's module itself, compiled
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
    # "fp32" | "fp16-cl" | "bf16-cl" | "bf16-autocast" | "compile" | "compile-fp16-cl" |
    # "fp16-cl-autotune" | "nograd-y" (train: y outside autograd)
    mode: str = "fp32"

    def unavailable(self, ctx: Context, case: Case) -> str | None:
        why = super().unavailable(ctx, case)
        if why:
            return why
        if self.mode == "nograd-y" and case.workload.name != "train":
            return "train workload only (the others have no y in autograd)"
        if self.mode.startswith("compile"):
            if ctx.quick:
                return ("skipped in --quick: torch.compile spends tens of seconds to minutes "
                        "compiling each shape; run without --quick")
            if ctx.device == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
                return "no C++ compiler on PATH for torch.compile's CPU code (Inductor)"
        return None

    def runner(self, ctx: Context, case: Case) -> Runner:
        return TorchRunner(ctx, case, self.mode)
