"""Stage ``parity`` of scripts/gpu_check.py: the Engine on the GPU against float32 PyTorch,
tier by tier (strict float32, TF32 in NCHW and NHWC, float16; gradients; LPIPS; DISTS)."""
from __future__ import annotations

import os

from gpu_check_base import Check, Models, Skip, rel


class Parity:
    def __init__(self, check: Check, models: Models) -> None:
        import torch

        self.check, self.models = check, models
        self.dev = "cpu" if check.dry_run else "cuda"
        self.device = "cpu" if check.dry_run else "cuda"  # the Engine's
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference: strict float32
        torch.backends.cudnn.allow_tf32 = False
        g = torch.Generator(device=self.dev).manual_seed(0)
        n, h, w = (2, 37, 45) if check.dry_run else (4, 224, 160)
        self.x = torch.rand(n, 3, h, w, device=self.dev, generator=g)
        self.y = torch.rand(n, 3, h, w, device=self.dev, generator=g)
        self._ref: dict = {}

    def reference(self, grad: bool) -> dict:
        import torch

        from perceptual_engine import TorchPerceptualLoss
        from perceptual_engine.weights import load_weights

        if grad not in self._ref:
            ref = TorchPerceptualLoss(self.models.spec, self.models.loss,
                                      weights=load_weights(self.models.spec)).to(self.dev)
            x = self.x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = ref(x, self.y)
                if grad:
                    out["total"].sum().backward()
            want = {k: v.detach() for k, v in out.items()}
            if grad:
                want["grad.x"] = x.grad.detach()
            self._ref[grad] = want
        return self._ref[grad]

    def engine(self, path: str, **opts):
        from perceptual_engine import Engine
        from perceptual_engine.runtime import ProviderOptions

        return Engine(path, self.device, options=ProviderOptions(**opts))

    def forward(self, dtype: str, tier: str, tf32: bool, nhwc: bool) -> dict:
        from perceptual_engine.bench.variants import TOLERANCE

        eng = self.engine(self.models.get("distance", dtype), tf32=tf32, prefer_nhwc=nhwc)
        got, want = eng.distance(self.x, self.y), self.reference(False)
        errors = {k: rel(got[k], want[k]) for k in want}
        worst = max(errors.values())
        return {"ok": worst <= TOLERANCE[tier], "max_rel": worst, "limit": TOLERANCE[tier],
                "providers": eng.providers, "errors": errors}

    def gradient(self, dtype: str, tier: str, tf32: bool) -> dict:
        from perceptual_engine.bench.variants import GRAD_FORGIVE, GRAD_TOLERANCE, TOLERANCE

        eng = self.engine(self.models.get("distance", dtype, grad=True), tf32=tf32)
        got, want = eng.distance(self.x, self.y), self.reference(True)
        terms = max(rel(got[k], want[k]) for k in want if k != "grad.x")
        gx = rel(got["grad.x"], want["grad.x"], GRAD_FORGIVE[tier])
        import torch

        finite = bool(torch.isfinite(torch.as_tensor(got["grad.x"])).all())
        return {"ok": finite and terms <= TOLERANCE[tier] and gx <= GRAD_TOLERANCE[tier],
                "terms_max_rel": terms, "limit": TOLERANCE[tier], "grad_x": gx,
                "grad_limit": GRAD_TOLERANCE[tier], "grad_forgive": GRAD_FORGIVE[tier],
                "grad_x_unforgiven": rel(got["grad.x"], want["grad.x"]),
                "grad_x_forgive_0.1%": rel(got["grad.x"], want["grad.x"], 1e-3), "finite": finite}

    def lpips(self, dtype: str, limit: float) -> dict:
        import importlib.util

        import torch

        from perceptual_engine import lpips as L
        from perceptual_engine.export import export_onnx
        from perceptual_engine.lpips import TorchLPIPS

        if importlib.util.find_spec("lpips") is None:
            raise Skip("the lpips package is not installed (carry its wheel: --wheels, docs/gpu.md)")
        spec = L.default_spec("random", input_range="-1,1")
        path = os.path.join(self.models.cache_dir, f"gpu-check-lpips-{dtype}.onnx")
        if not os.path.exists(path):
            export_onnx(spec, path, graph="lpips", dtype=dtype, grad=dtype == "float32")
        ref = TorchLPIPS(spec).to(self.dev)
        x, y = self.x * 2 - 1, self.y * 2 - 1
        with torch.no_grad():
            want = ref(x, y)
        got = self.engine(path, tf32=False).distance(x, y)
        errors = {k: rel(got[k], want[k]) for k in want}
        worst = max(errors.values())
        return {"ok": worst <= limit, "max_rel": worst, "limit": limit, "errors": errors}

    def dists(self) -> dict:
        import importlib

        try:
            importlib.import_module("perceptual_engine.dists")
        except ImportError:
            raise Skip("perceptual_engine.dists is not in this checkout") from None
        from perceptual_engine.export import export_onnx
        from perceptual_engine.export.graphs import GRAPH_KINDS

        if "dists" not in GRAPH_KINDS:
            raise Skip(f"no 'dists' graph kind in export ({', '.join(GRAPH_KINDS)})")
        dists = importlib.import_module("perceptual_engine.dists")
        spec = dists.default_spec("random")  # the module's spec helper, as lpips.default_spec
        path = os.path.join(self.models.cache_dir, "gpu-check-dists.onnx")
        if not os.path.exists(path):
            export_onnx(spec, path, graph="dists")
        from perceptual_engine import Engine

        want = Engine(path, "cpu").distance(self.x.cpu().numpy(), self.y.cpu().numpy())
        got = self.engine(path, tf32=False).distance(self.x, self.y)
        errors = {k: rel(got[k], want[k]) for k in want}
        terms = max(v for k, v in errors.items() if k != "total")
        # Single terms are 1 − a ratio near 1 (texture.input compares raw pixel statistics):
        # the H200 run had 1.8e-4 there from the CUDA reduction order, with total at 4.6e-7.
        return {"ok": errors["total"] <= 1e-4 and terms <= 1e-3, "total": errors["total"], "total_limit": 1e-4,
                "terms_max_rel": terms, "terms_limit": 1e-3, "vs": "the same model on ORT CPU", "errors": errors}


def run_parity(check: Check, models: Models) -> None:
    p = Parity(check, models)
    layouts = (False,) if check.dry_run else (False, True)
    for nhwc in layouts:
        lay = "nhwc" if nhwc else "nchw"
        check.record(f"parity.fwd.fp32-strict.{lay}", lambda n=nhwc: p.forward("float32", "fp32", False, n), need_s=20)
        if not check.dry_run:
            check.record(f"parity.fwd.tf32.{lay}", lambda n=nhwc: p.forward("float32", "tf32", True, n), need_s=20)
    check.record("parity.grad.fp32-strict", lambda: p.gradient("float32", "fp32", False), need_s=30)
    if not check.dry_run:  # float16 on the CPU runs in float32 (export/exporter.py FP16_CPU_NOTE)
        check.record("parity.fwd.fp16", lambda: p.forward("float16", "fp16", False, False), need_s=30)
        check.record("parity.grad.tf32", lambda: p.gradient("float32", "tf32", True), need_s=20)
        check.record("parity.grad.fp16", lambda: p.gradient("float16", "fp16", False), need_s=30)
        check.record("parity.lpips.fp32", lambda: p.lpips("float32", 1e-4), need_s=40)
        check.record("parity.lpips.fp16", lambda: p.lpips("float16", 1e-2), need_s=40)
    check.record("parity.dists", p.dists, need_s=30)
