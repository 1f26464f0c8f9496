"""What a benchmark variant is: the Context the variants of one run share, the Runner
one variant makes for one Case (build, call, sync, close), and the Variant that says
whether it can run here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .workloads import Case


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
