#!/usr/bin/env python3
"""Which CUDA session settings compute the Gram's reshape right: an A/B on the GPU.

    python3 scripts/gpu_stream_check.py [--out DIR]

The first H200 run (BENCHMARKS.md, "NVIDIA H200") saw ``Reshape node_view_*: requested
shape {4,64,52277600}`` for a (4, 64, 224, 160) feature on the CUDA provider, in
distance and gradient graphs, once torch had CUDA up. This runs the same style graph
with every candidate setting, several calls each, numpy and CUDA-tensor inputs,
against the CPU provider, and prints one line per setting (errors counted, worst
relative difference). Exit status 0 when the default Engine settings are right.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

SHAPES = ((4, 3, 224, 160), (8, 3, 224, 224), (3, 3, 97, 131))
CALLS = 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort

    from perceptual_engine import FeatureSpec, LossConfig, export_onnx
    from perceptual_engine.runtime import providers as P

    P.preload_cuda()
    spec = FeatureSpec(weights="random", seed=0, layers=("relu1_2", "relu2_2", "relu3_4"))
    loss = LossConfig(content={"relu3_4": 1.0}, style={"relu1_2": 1.0, "relu2_2": 1.0, "relu3_4": 1.0})
    path = os.path.join(tempfile.gettempdir(), "pe-stream-check.onnx")
    export_onnx(spec, path, graph="distance", loss=loss)
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.uniform(0, 1, s).astype(np.float32) for _ in range(2)) for s in SHAPES]
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in cpu.get_outputs()]
    want = [dict(zip(names, cpu.run(None, {"x": x, "y": y}))) for x, y in pairs]
    results: dict = {}

    def score(label: str, call) -> None:
        errors, worst, first = 0, 0.0, None
        for (x, y), ref in zip(pairs, want):
            for _ in range(CALLS):
                try:
                    got = call(x, y)
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    errors += 1
                    first = first or f"{type(exc).__name__}: {str(exc)[-220:]}"
                    continue
                for k, v in ref.items():
                    g = got[k]
                    g = g.detach().cpu().numpy() if hasattr(g, "detach") else np.asarray(g)
                    worst = max(worst, float(np.abs(g - v).max() / max(np.abs(v).max(), 1e-30)))
        results[label] = {"errors": errors, "calls": CALLS * len(pairs), "worst_rel": worst, "first_error": first}
        print(f"{label:44s} errors {errors:2d}/{CALLS * len(pairs)}  worst rel {worst:.2e}  {first or ''}", flush=True)

    def raw(opts: dict):
        s = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])
        return lambda x, y: dict(zip(names, s.run(None, {"x": x, "y": y})))

    score("raw ORT, CUDA defaults, torch CUDA not up", raw({}))
    import torch

    torch.zeros(1, device="cuda")
    score("raw ORT, CUDA defaults, torch CUDA up", raw({}))
    ours = P.cuda_options(P.ProviderOptions(tf32=False))
    score("raw ORT, the Engine's options, own stream", raw(ours))
    score("raw ORT, the Engine's options, torch's stream",
          raw({**ours, "has_user_compute_stream": "1",
               "user_compute_stream": str(torch.cuda.current_stream().cuda_stream)}))
    side = torch.cuda.Stream()
    score("raw ORT, the Engine's options, a side stream",
          raw({**ours, "has_user_compute_stream": "1", "user_compute_stream": str(side.cuda_stream)}))

    from perceptual_engine import Engine
    from perceptual_engine.runtime import ProviderOptions

    for share in (False, True):
        eng = Engine(path, "cuda", options=ProviderOptions(tf32=False, share_torch_stream=share))
        score(f"Engine share_torch_stream={share}, numpy", eng.distance)
        score(f"Engine share_torch_stream={share}, CUDA tensors",
              lambda x, y, e=eng: e.distance(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()))
    default = Engine(path, "cuda", options=ProviderOptions(tf32=False))
    score("Engine defaults, CUDA tensors",
          lambda x, y: default.distance(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()))
    with open(os.path.join(args.out, "gpu_stream_check.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    ok = results["Engine defaults, CUDA tensors"]
    return 0 if ok["errors"] == 0 and ok["worst_rel"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
