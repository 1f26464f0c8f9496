"""What every stage of scripts/gpu_check.py shares: the budget keeper (Check), the skip
signal, the models (exported through the benchmark's cache), and the error measure."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

FULL_LAYERS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4")  # the bench's default network
DRY_LAYERS = ("relu1_1", "relu1_2")  # no pooling: the cheapest exports


class Check:
    """Runs named checks, records value or error and time, keeps the budget."""

    def __init__(self, out: str, budget_s: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.stage_deadline = float("inf")
        self.results: dict = {"dry_run": dry_run, "checks": {}}

    def left(self) -> float:
        """Seconds left: of the run, or of the current stage when that ends first."""
        return min(self.deadline, self.stage_deadline) - time.perf_counter()

    @contextlib.contextmanager
    def stage(self, seconds: float | None):
        """Checks started inside keep within ``seconds`` (None: the run's budget only)."""
        self.stage_deadline = float("inf") if seconds is None else time.perf_counter() + seconds
        try:
            yield
        finally:
            self.stage_deadline = float("inf")

    def record(self, name: str, fn, *, need_s: float = 0.0) -> object:
        entry: dict = {}
        if self.left() < need_s:
            entry = {"status": "not run", "reason": f"budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                value = fn()
                ok = value.pop("ok", True) if isinstance(value, dict) else True
                entry = {"status": "pass" if ok else "FAIL", "value": value}
            except Skip as exc:
                entry = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                entry = {"status": "FAIL", "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                         "trace": traceback.format_exc()[-2000:]}
            entry["seconds"] = round(time.perf_counter() - t, 2)
        self.results["checks"][name] = entry
        shown = entry.get("value", entry.get("error", entry.get("reason")))
        print(f"[{name}] {entry['status']}: {json.dumps(shown, default=str)[:400]}", flush=True)
        return entry.get("value")


class Skip(Exception):
    """A check that cannot run here (a package or a GPU missing): skipped, not failed."""


class Models:
    """Exports through the benchmark's model cache (same spec, loss and cache folder), so
    the bench stage reuses them."""

    def __init__(self, cache_dir: str, layers: tuple[str, ...]) -> None:
        from perceptual_engine.bench import workloads as W
        from perceptual_engine.spec import FeatureSpec

        self.cache_dir = cache_dir
        self.spec = FeatureSpec(arch="vgg19", layers=layers, weights="random", seed=0)
        self.loss = W.get("train").loss(self.spec)  # content + style: the gradient workloads' loss
        self.paths: dict = {}

    def get(self, graph: str, dtype: str = "float32", grad: bool = False, loss=None) -> str:
        from perceptual_engine.datasets.cache import ensure_model

        loss = self.loss if loss is None else loss
        if graph == "features":
            loss = None
        key = (graph, dtype, grad, loss)
        if key not in self.paths:  # the bench's folder layout: models directly in cache_dir
            entry = ensure_model(self.spec, loss, dtype=dtype, graph=graph,
                                 folder=self.cache_dir, **({"grad": True} if grad else {}))
            self.paths[key] = entry.path
        return self.paths[key]


def rel(got, want, forgive: float = 0.0) -> float:
    import numpy as np

    from perceptual_engine.export.verify import compare

    def host(v):
        return v if isinstance(v, np.ndarray) else v.detach().double().cpu().numpy()

    return compare(host(got), host(want), forgive).max_rel
