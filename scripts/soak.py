"""Soak: many distance calls at varying shapes on one Engine; report RSS growth.

    python scripts/soak.py --calls 10000 [--arena on|off] [--json out.json]
    python scripts/soak.py --loss --calls 3000   # EnginePerceptualLoss training steps

Exports a small random-weight model (to relu2_2) once, then calls
Engine.distance with batch 1-3 and sides 16-64 drawn from a seeded RNG. RSS is
sampled after a warm-up of 10% of the calls and at the end: the growth between
them is what a long-running service would see. With --loss, each call is a
training step instead: EnginePerceptualLoss forward and backward on a gradient
model (distance graph, grad=True), with the shapes drawn the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--arena", choices=("on", "off"), default=None,
                    help="force ONNX Runtime's CPU memory arena (default: the Engine's choice)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--loss", action="store_true",
                    help="soak EnginePerceptualLoss (forward + backward) instead of Engine.distance")
    args = ap.parse_args(argv)

    from perceptual_engine import Engine, FeatureSpec, LossConfig, export_onnx

    spec = FeatureSpec(layers=("relu1_2", "relu2_2"), weights="random")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "soak.onnx")
        export_onnx(spec, path, graph="distance",
                    loss=LossConfig(content={"relu2_2": 1.0}, style={"relu1_2": 1.0}), grad=args.loss)
        arena = None if args.arena is None else args.arena == "on"
        if args.loss:
            import torch

            from perceptual_engine import EnginePerceptualLoss

            module = EnginePerceptualLoss(path, device="cpu", cpu_arena=arena)
            engine = module.engine

            def call(x, y):
                xt = torch.from_numpy(x).requires_grad_()
                out = module(xt, torch.from_numpy(y))
                out["total"].sum().backward()
                assert xt.grad is not None and xt.grad.shape == xt.shape
                return {"total": out["total"].detach().numpy()}
        else:
            engine = Engine(path, device="cpu", cpu_arena=arena)
            call = engine.distance
        rng = np.random.default_rng(0)
        warm = max(1, args.calls // 10)
        start = time.perf_counter()
        base = None
        for i in range(args.calls):
            n = int(rng.integers(1, 4))
            h, w = (int(v) for v in rng.integers(16, 65, size=2))
            x = rng.random((n, 3, h, w), dtype=np.float32)
            y = rng.random((n, 3, h, w), dtype=np.float32)
            out = call(x, y)
            assert out["total"].shape == (n,)
            if i + 1 == warm:
                base = rss_mb()
        end = rss_mb()
        result = {
            "calls": args.calls,
            "seconds": round(time.perf_counter() - start, 2),
            "rss_after_warmup_mb": round(base or 0, 1),
            "rss_end_mb": round(end, 1),
            "rss_growth_mb": round(end - (base or end), 1),
            "cpu_arena": engine.cpu_arena,
            "mode": "loss" if args.loss else "distance",
        }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
